"""What one generation cost: its timings, its RPCs and their time split, for results and logs."""
from __future__ import annotations

import time

from teegpu.options import rpcs_per_forward


class GenerationClock:
    """Snapshots the engine's RPC totals around one generation, labels each forward pass in the RPC
    log (prefill or decode, and the token it produces), and reports the difference."""

    def __init__(self, engine):
        self.engine = engine
        self.before = engine.rpc_summary()
        # the trusted process's CPU time (all its threads: the mask pool's, the pad client's) at the
        # start, and once the prefill is done
        self.cpu_s = [time.process_time()]

    def phase(self, seq) -> None:
        if seq.decoding and len(self.cpu_s) == 1:
            self.cpu_s.append(time.process_time())
        tel = self.engine.telemetry
        if tel is not None:
            tel.phase, tel.token = ("decode" if seq.decoding else "prefill"), len(seq.out)

    def report(self, seq, load_s: float) -> tuple[dict, dict]:
        """(timings, rpc) of a finished sequence; also writes its time split to the RPC log."""
        after = self.engine.rpc_summary()
        rpc = difference(after, self.before)
        prefill_ms = ((seq.first_token_s or seq.started_s) - seq.started_s) * 1000
        decode_ms = seq.decode_s * 1000
        tokens = seq.decode_tokens  # the decode steps' tokens: as many as steps, or more with speculation
        timings = {"load_s": round(load_s, 3), "prefill_ms": round(prefill_ms, 3),
                   "decode_ms_per_token": round(decode_ms / tokens, 3) if tokens else None}
        timings.update(self.cpu_times(tokens))
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


    def cpu_times(self, decode_tokens: int) -> dict:
        """The trusted process's CPU time (time.process_time) in the prefill and per decoded token."""
        end = time.process_time()
        prefilled = self.cpu_s[1] if len(self.cpu_s) > 1 else end
        return {"prefill_cpu_ms": round((prefilled - self.cpu_s[0]) * 1000, 3),
                "decode_cpu_ms_per_token": round((end - prefilled) * 1000 / decode_tokens, 3) if decode_tokens else None}


def difference(after: dict, before: dict) -> dict:
    """after - before, key by key; a label (a string) is after's."""
    return {k: difference(v, before[k]) if isinstance(v, dict) else v if isinstance(v, str)
            else round(v - before[k], 3) for k, v in after.items()}
