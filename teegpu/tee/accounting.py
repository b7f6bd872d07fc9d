"""What one generation cost: its timings, its RPCs and their time split, for results and logs."""
from __future__ import annotations

from teegpu.options import rpcs_per_forward


class GenerationClock:
    """Snapshots the engine's RPC totals around one generation, labels each forward pass in the RPC
    log (prefill or decode, and the token it produces), and reports the difference."""

    def __init__(self, engine):
        self.engine = engine
        self.before = engine.rpc_summary()

    def phase(self, seq) -> None:
        tel = self.engine.telemetry
        if tel is not None:
            tel.phase, tel.token = ("decode" if seq.decoding else "prefill"), len(seq.out)

    def report(self, seq, load_s: float) -> tuple[dict, dict]:
        """(timings, rpc) of a finished sequence; also writes its time split to the RPC log."""
        after = self.engine.rpc_summary()
        rpc = difference(after, self.before)
        prefill_ms = ((seq.first_token_s or seq.started_s) - seq.started_s) * 1000
        decode_ms = seq.decode_s * 1000
        timings = {"load_s": round(load_s, 3), "prefill_ms": round(prefill_ms, 3),
                   "decode_ms_per_token": round(decode_ms / seq.decode_steps, 3) if seq.decode_steps else None}
        breakdown = rpc.get("breakdown_ms")
        if breakdown:  # the trusted side's own compute: forward time outside the RPCs
            timings["trusted_ms"] = round(prefill_ms + decode_ms - breakdown["total_ms"], 3)
        pool = after.get("mask_pool")
        if pool is not None:  # pad precomputation per token: one row for every weight
            per_row = pool["fill_ms"] / max(pool["rows_filled"], 1)
            timings["offline_ms_per_token"] = round(per_row * rpcs_per_forward(self.engine.config.num_layers), 3)
        tel = self.engine.telemetry
        if tel is not None and breakdown:
            rows = len(seq.prompt_ids) + seq.decode_steps  # pad rows used: every position once
            tel.write_generation({"tokens": len(seq.out), "forwards": seq.decode_steps + 1, "time_split_ms": {
                "offline": round(timings.get("offline_ms_per_token", 0.0) * rows, 3),
                "transfer": round(breakdown["total_ms"] - breakdown["server_compute_ms"], 3),
                "server_compute": breakdown["server_compute_ms"], "trusted_compute": timings["trusted_ms"]}})
            tel.phase, tel.token = "idle", len(seq.out)
        return timings, rpc


def difference(after: dict, before: dict) -> dict:
    return {k: difference(v, before[k]) if isinstance(v, dict) else round(v - before[k], 3)
            for k, v in after.items()}
