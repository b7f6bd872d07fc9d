"""Every variant of the runtime and its baselines, measured side by side in one run.

    python -m bench [--tokens 128] [--prefill 128,512] [--repeats 3] [--dtypes float32,bfloat16]
                    [--planes tcp,ipc,shm,doorbell] [--transfer-mb 10] [--no-privacy] [--model PATH] [--json]

Columns, per dtype: monolithic transformers (`hf`), the TEE-only engine computing
everything itself (`tee-only`), and the split runtime over each plane (tcp, ipc: tensors in
the messages; shm: tensors in /dev/shm, requests by message; doorbell: tensors and requests
in /dev/shm, ZeroMQ only to wake a sleeping side); then, on the
last plane in float32, the verified and the one-time-pad variants (`verify`, `otp`,
`otp verify`; the pad pool is refilled between repeats, outside the timing, and its cost
reported as offline ms per token); then the limits of this machine (raw pyzmq echo, memcpy,
the spin floor: a sequence number bounced through /dev/shm by two spinning processes). Repeats are interleaved across columns
so that the machine's drift hits every column alike; cells are median (min).
Threads: the monolithic and TEE-only columns use all cores, in a process of their own started
with the user's environment (OpenMP's default policy: idle workers spin a while, best for a
process alone on its cores); in the split both sides use all cores and, as under the `teegpu`
command, idle OpenMP workers sleep: the two sides take turns (bench/__init__.py).
"""
from __future__ import annotations

import argparse
import json
import mmap
import multiprocessing
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import zmq
from tqdm import tqdm

from bench import monolithic_env

from teegpu.model.loading import load_weights
from teegpu.model.products import threads_per_core
from teegpu.model.tokenizer import load_tokenizer
from teegpu.model.reference import transformers_model
from teegpu.options import OPENMP_WAIT_POLICY, rpcs_per_forward
from teegpu.protocol import WIRE_DTYPES, Op
from teegpu.config import ServerConfig
from teegpu.server_process import ServerProcess, private_endpoint
from teegpu.tee.engine import Engine, trusted_threads
from teegpu.tee.linears import LocalLinears

TEXT = Path(__file__).with_name("sample_text.txt")
ROWS = ("prefill_{n}_ms", "decode_ms_per_token", "server_ms_per_token", "transfer_ms_per_token",
        "trusted_ms_per_token", "offline_ms_per_token", "rpcs_per_token", "bytes_per_token", "rpc_overhead_us",
        "transfer_ms")
CORES = os.cpu_count() or 1
# how a column's client talks to its server: tensors in messages, or through /dev/shm with the
# requests announced by message ("shm") or by the region's doorbell ("doorbell")
PLANES = {"tcp": dict(data_plane="socket"), "ipc": dict(data_plane="socket"),
          "shm": dict(data_plane="shm", control_plane="socket"), "doorbell": dict(data_plane="shm")}


@dataclass
class Column:
    name: str
    dtype: str
    run: object  # callable(measure: dict) -> None, fills one repeat's figures
    samples: dict = field(default_factory=dict)


# ---- the three kinds of runtime ----

class MonolithicProcess:
    """The monolithic columns (hf and tee-only, each dtype) in a child process started with the
    user's environment; each run is asked for by name and its figures sent back."""

    def __init__(self, model, dtypes, ids: list[int], prefill: list[int], tokens: int):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        saved = dict(os.environ)
        os.environ.clear()
        os.environ.update(monolithic_env())  # a spawned child starts with the environment of this moment
        try:
            self.proc = ctx.Process(target=_monolithic_runs, args=(child, model, dtypes, ids, prefill, tokens),
                                    daemon=True)
            self.proc.start()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        child.close()
        self.names = self.conn.recv()

    def columns(self) -> list[Column]:
        return [Column(name, dtype, lambda out, name=name: out.update(self._run(name))) for name, dtype in self.names]

    def _run(self, name: str) -> dict:
        self.conn.send(name)
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(30)


def _monolithic_runs(conn, model, dtypes, ids, prefill, tokens) -> None:
    weights, tok = load_weights(model), load_tokenizer(model)
    runs = {}
    for dtype in dtypes:
        runs[f"hf {dtype}", dtype] = hf_column(model, dtype, ids, prefill, tokens).run
        local = Engine(weights, tok, LocalLinears(weights, WIRE_DTYPES[dtype]), dtype=WIRE_DTYPES[dtype])
        runs[f"tee-only {dtype}", dtype] = engine_run(local, ids, prefill, tokens, CORES)
    conn.send(list(runs))
    by_name = {name: run for (name, _), run in runs.items()}
    while (name := conn.recv()) is not None:
        out: dict = {}
        by_name[name](out)
        conn.send(out)


def hf_column(model, dtype: str, ids: list[int], prefill: list[int], tokens: int) -> Column:
    hf = transformers_model(model, WIRE_DTYPES[dtype])

    @torch.inference_mode()
    def run(out: dict) -> None:
        torch.set_num_threads(CORES)
        for n in prefill:
            t0 = time.perf_counter()
            hf(torch.tensor([ids[:n]]), use_cache=True, logits_to_keep=1)
            out[f"prefill_{n}_ms"] = (time.perf_counter() - t0) * 1000
        res = hf(torch.tensor([ids[:16]]), use_cache=True, logits_to_keep=1)
        cache, token = res.past_key_values, int(res.logits[0, -1].argmax())
        t0 = time.perf_counter()
        for _ in range(tokens):
            res = hf(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
            cache, token = res.past_key_values, int(res.logits[0, -1].argmax())
        out["decode_ms_per_token"] = (time.perf_counter() - t0) * 1000 / tokens

    return Column(f"hf {dtype}", dtype, run)


def engine_run(engine: Engine, ids: list[int], prefill: list[int], tokens: int, threads: int):
    @torch.inference_mode()
    def run(out: dict) -> None:
        torch.set_num_threads(threads)
        for n in prefill:
            cache = engine.new_cache(n)
            t0 = time.perf_counter()
            engine.forward(ids[:n], 0, cache)
            out[f"prefill_{n}_ms"] = (time.perf_counter() - t0) * 1000
        cache = engine.new_cache(16 + tokens)
        token = int(engine.forward(ids[:16], 0, cache)[-1].argmax())
        before = engine.client.stats.as_dict() if engine.client else None
        tel = engine.telemetry
        rpc_ms, server_ms = (tel.totals["total_ms"], tel.totals["server_compute_ms"]) if tel else (0.0, 0.0)
        t0 = time.perf_counter()
        for i in range(tokens):
            token = int(engine.forward([token], 16 + i, cache)[-1].argmax())
        out["decode_ms_per_token"] = (time.perf_counter() - t0) * 1000 / tokens
        if before is not None:  # the decode step in three parts (the fourth, offline, is the pool's)
            rpc_ms, server_ms = tel.totals["total_ms"] - rpc_ms, tel.totals["server_compute_ms"] - server_ms
            out["server_ms_per_token"] = server_ms / tokens
            out["transfer_ms_per_token"] = (rpc_ms - server_ms) / tokens
            out["trusted_ms_per_token"] = out["decode_ms_per_token"] - rpc_ms / tokens
            after = engine.client.stats.as_dict()
            out["rpcs_per_token"] = (after["calls"] - before["calls"]) / tokens
            out["bytes_per_token"] = (after["bytes_sent"] + after["bytes_received"]
                                      - before["bytes_sent"] - before["bytes_received"]) / tokens
    return run


def small_rpc_overhead_us(engine: Engine, calls: int = 200) -> float:
    """Median of (round trip through the runtime - server compute) for one-token QKV calls."""
    x = torch.randn(1, engine.config.hidden_size).to(engine.dtype)
    tel, gaps = engine.telemetry, []
    for i in range(calls + 20):
        compute = tel.totals["server_compute_ms"]
        t0 = time.perf_counter_ns()
        engine.linears.linear(Op.QKV, 0, x)
        gap = (time.perf_counter_ns() - t0) / 1e3 - (tel.totals["server_compute_ms"] - compute) * 1e3
        if i >= 20:
            gaps.append(gap)
    return statistics.median(gaps)


def transfer_ms(client, nbytes: int) -> float:
    """One tensor of nbytes to the server (SINK), a header back: the one-way cost of the plane."""
    t = torch.randn(nbytes // 4)
    times = []
    for _ in range(7):
        t0 = time.perf_counter_ns()
        client.call(Op.SINK, 0, [t])
        times.append((time.perf_counter_ns() - t0) / 1e6)
    return min(times[2:])


def split_column(engine: Engine, plane: str, dtype: str, ids, prefill, tokens, transfer_bytes) -> Column:
    engine.threads = trusted_threads()  # as Engine.open sets it: prefill steps on every core, decode on one
    decode = engine_run(engine, ids, prefill, tokens, threads=1)

    def run(out: dict) -> None:
        decode(out)
        out["rpc_overhead_us"] = small_rpc_overhead_us(engine)
        out["transfer_ms"] = transfer_ms(engine.client, transfer_bytes)

    return Column(f"split {plane} {dtype}", dtype, run)


def private_column(engine: Engine, name: str, ids, prefill, tokens) -> Column:
    """Verified and/or padded: the online cost timed; pads for the whole run precomputed before."""
    engine.threads = trusted_threads()
    decode = engine_run(engine, ids, prefill, tokens, threads=1)
    pool = getattr(engine.linears, "pool", None)
    if pool is not None:
        pool.close()  # no background refills while other columns are timed

    def run(out: dict) -> None:
        if pool is not None:
            pool.refill()
        decode(out)
        if pool is not None:
            out["offline_ms_per_token"] = pool.offline_ms_per_token()

    return Column(name, "float32", run)


# ---- the limits of this machine ----

def _echo_server(url: str) -> None:
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.bind(url)
    while True:
        msg = sock.recv_multipart(copy=False)
        if len(msg) == 2 and msg[1].bytes == b"stop":
            return
        sock.send_multipart([msg[0], b"ok"] if len(msg[1]) > 65536 else msg, copy=False)


def _spin_echo(path: str, rounds: int) -> None:
    """The other half of the spin floor: wait for each odd number in word 0, answer with the next."""
    with open(path, "r+b") as f:
        words = memoryview(mmap.mmap(f.fileno(), 4096)).cast("Q")
    for i in range(rounds):
        while words[0] != 2 * i + 1:
            pass
        words[0] = 2 * i + 2


def spin_floor_us(rounds: int = 2_000) -> float:
    """Median round trip of a sequence number through a MAP_SHARED file under /dev/shm, both sides
    spinning without yielding: what a doorbell costs when nothing else wants the cores."""
    path = f"/dev/shm/teegpu-bench-{os.getpid()}"
    with open(path, "w+b") as f:
        f.truncate(4096)
        words = memoryview(mmap.mmap(f.fileno(), 4096)).cast("Q")
    proc = multiprocessing.get_context("spawn").Process(target=_spin_echo, args=(path, rounds), daemon=True)
    proc.start()
    times = []
    try:
        for i in range(rounds):
            t0 = time.perf_counter_ns()
            words[0] = 2 * i + 1
            while words[0] != 2 * i + 2:
                pass
            times.append(time.perf_counter_ns() - t0)
    finally:
        proc.join(10)
        os.unlink(path)
    return statistics.median(times[rounds // 10:]) / 1e3


def limits_column(transfer_bytes: int) -> Column:
    url = private_endpoint()
    proc = multiprocessing.get_context("spawn").Process(target=_echo_server, args=(url,), daemon=True)
    proc.start()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(url)
    small, big = b"x" * 2304, bytearray(transfer_bytes)  # a decode-step request; a transfer
    src, dst = torch.ones(transfer_bytes, dtype=torch.uint8), torch.empty(transfer_bytes, dtype=torch.uint8)

    def timed(payload, n):
        times = []
        for _ in range(n):
            t0 = time.perf_counter_ns()
            sock.send(payload, copy=len(payload) < 65536)
            sock.recv()
            times.append((time.perf_counter_ns() - t0) / 1e3)
        return times

    def run(out: dict) -> None:
        out["rpc_overhead_us"] = statistics.median(timed(small, 520)[20:])
        out["spin_floor_us"] = spin_floor_us()
        out["transfer_ms"] = min(timed(big, 7)[2:]) / 1e3
        copies = []
        for _ in range(20):
            t0 = time.perf_counter_ns()
            dst.copy_(src)
            copies.append((time.perf_counter_ns() - t0) / 1e6)
        out["memcpy_ms"] = min(copies)

    col = Column("limits", "", run)
    col.close = lambda: (sock.send(b"stop"), proc.join(10), sock.close(0))
    return col


# ---- the run ----

def measure(model=None, tokens: int = 128, prefill=(128, 512), repeats: int = 3, dtypes=("float32", "bfloat16"),
            planes=("tcp", "ipc", "shm", "doorbell"), transfer_mb: float = 10.0, progress: bool = True,
            privacy: bool = True) -> dict:
    tok = load_tokenizer(model)
    ids = tok.encode(TEXT.read_text())
    prefill = list(prefill)
    if max(prefill) > len(ids):
        raise SystemExit(f"the sample text has {len(ids)} tokens, fewer than a prefill of {max(prefill)}")
    transfer_bytes = int(transfer_mb * 1e6)
    weights = load_weights(model)
    columns, servers, engines = [], [], []
    monolithic = MonolithicProcess(model, dtypes, ids, prefill, tokens)
    try:
        baselines = monolithic.columns()
        for dtype in dtypes:
            columns += [c for c in baselines if c.dtype == dtype]
            for plane in planes:
                endpoint = "tcp://127.0.0.1:*" if plane == "tcp" else private_endpoint()
                server = ServerProcess(ServerConfig(model=model, endpoint=endpoint, dtype=dtype))
                servers.append(server)
                engine = Engine.connect(weights, tok, server.wait_ready(), **PLANES[plane])
                engines.append(engine)
                columns.append(split_column(engine, plane, dtype, ids, prefill, tokens, transfer_bytes))
        if privacy:
            plane = planes[-1]
            for mode, verify in (("plain", True), ("otp", False), ("otp", True)):
                endpoint = "tcp://127.0.0.1:*" if plane == "tcp" else private_endpoint()
                server = ServerProcess(ServerConfig(model=model, endpoint=endpoint, privacy=mode))
                servers.append(server)
                engine = Engine.connect(weights, tok, server.wait_ready(), privacy=mode, verify=verify,
                                        mask_pool_rows=sum(prefill) + 16 + tokens, **PLANES[plane])
                engines.append(engine)
                name = f"{'otp' if mode == 'otp' else 'split'}{' verify' if verify else ''} {plane}"
                columns.append(private_column(engine, name, ids, prefill, tokens))
        columns.append(limits_column(transfer_bytes))
        bar = tqdm(total=repeats * len(columns), desc="bench", unit="run", disable=not progress, file=sys.stderr)
        for _ in range(repeats):
            for col in columns:
                bar.set_postfix_str(col.name)
                figures: dict = {}
                col.run(figures)
                for k, v in figures.items():
                    col.samples.setdefault(k, []).append(v)
                bar.update()
        bar.close()
    finally:
        for engine in engines:
            engine.close()
        for server in servers:
            server.stop()
        for col in columns:
            getattr(col, "close", lambda: None)()
        monolithic.close()
    cfg = weights.config
    return {
        "model": str(model or "SmolLM2-135M-Instruct (default)"), "tokens": tokens, "prefill": prefill,
        "repeats": repeats, "cores": CORES, "threads_per_core": threads_per_core(), "transfer_bytes": transfer_bytes,
        "torch": torch.__version__,
        "trusted_threads": trusted_threads(), "wait_policy": os.environ.get(OPENMP_WAIT_POLICY, "default"),
        "expected_rpcs_per_token": rpcs_per_forward(cfg.num_layers),
        "columns": {c.name: {k: {"min": min(v), "median": statistics.median(v), "samples": v}
                             for k, v in c.samples.items()} | {"dtype": c.dtype} for c in columns},
    }


def targets(res: dict) -> list[str]:
    """The issue's targets, each with its ratio from this run (medians)."""
    cols, lines = res["columns"], []
    lim = cols["limits"]
    for dtype in {c["dtype"] for c in cols.values() if c["dtype"]}:
        hf = cols.get(f"hf {dtype}")
        for name, c in cols.items():
            if not name.startswith("split") or c["dtype"] != dtype or "rpc_overhead_us" not in c:
                continue  # the plain split columns (the verified ones have their own lines)
            r = c["decode_ms_per_token"]["median"] / hf["decode_ms_per_token"]["median"]
            lines.append(f"{name}: decode {r:.2f}x hf (target <= 1.25) {'met' if r <= 1.25 else 'MISSED'}")
            big = f"prefill_{max(res['prefill'])}_ms"
            r = c[big]["median"] / hf[big]["median"]
            lines.append(f"{name}: {big} {r:.2f}x hf (target <= 1.25) {'met' if r <= 1.25 else 'MISSED'}")
            us = c["rpc_overhead_us"]["median"]
            lines.append(f"{name}: per-RPC overhead {us:.0f} us (target <= 20; pyzmq echo "
                         f"{lim['rpc_overhead_us']['median']:.0f} us, spin floor {lim['spin_floor_us']['median']:.1f} us) "
                         f"{'met' if us <= 20 else 'MISSED'}")
            rpt = c["rpcs_per_token"]["median"]
            lines.append(f"{name}: {rpt:g} RPCs/token (target {res['expected_rpcs_per_token']}) "
                         f"{'met' if rpt == res['expected_rpcs_per_token'] else 'MISSED'}")
            if " shm " in name or " doorbell " in name:
                r = c["transfer_ms"]["min"] / lim["memcpy_ms"]["min"]
                lines.append(f"{name}: transfer {r:.2f}x memcpy (target <= 5) {'met' if r <= 5 else 'MISSED'}")
    plain = next((n for n in cols if n.startswith("split") and n.endswith("float32")
                  and n.split()[1] == next((c.split()[-1] for c in cols if c.startswith("otp ")), None)), None)
    for name, c in cols.items():
        if name.startswith("split verify") and plain:
            r = c["decode_ms_per_token"]["median"] / cols[plain]["decode_ms_per_token"]["median"]
            lines.append(f"{name}: decode {r:.2f}x {plain} (the cost of --verify in plain mode)")
        if name.startswith("otp") and plain:
            r = c["decode_ms_per_token"]["median"] / cols[plain]["decode_ms_per_token"]["median"]
            lines.append(f"{name}: online decode {r:.2f}x {plain} (target <= 1.5) {'met' if r <= 1.5 else 'MISSED'}; "
                         f"offline {c['offline_ms_per_token']['median']:.1f} ms/token vs hf float32 decode "
                         f"{cols['hf float32']['decode_ms_per_token']['median']:.1f}")
    return sorted(lines)


def format_table(res: dict) -> str:
    """Markdown: one column per runtime, cells median (min) and the ratio to hf of the same dtype."""
    cols = res["columns"]
    names = list(cols)
    rows = [f"prefill_{n}_ms" for n in res["prefill"]] + list(ROWS[1:]) + ["memcpy_ms", "spin_floor_us"]
    labels = {"decode_ms_per_token": f"decode ms/token ({res['tokens']})", "rpcs_per_token": "RPCs/token",
              "offline_ms_per_token": "decode: offline (pads) ms/token",
              "server_ms_per_token": "decode: server compute ms/token",
              "transfer_ms_per_token": "decode: transfer ms/token", "trusted_ms_per_token": "decode: trusted ms/token",
              "bytes_per_token": "KB/token", "rpc_overhead_us": "small RPC us (limits: pyzmq echo)",
              "spin_floor_us": "shm spin round trip us",
              "transfer_ms": f"{res['transfer_bytes'] / 1e6:g} MB one-way ms", "memcpy_ms":
              f"{res['transfer_bytes'] / 1e6:g} MB memcpy ms"}
    out = ["| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for row in rows:
        cells = []
        for name in names:
            c = cols[name].get(row)
            if c is None:
                cells.append("")
                continue
            scale = 1e-3 if row == "bytes_per_token" else 1
            cell = f"{c['median'] * scale:.3g} ({c['min'] * scale:.3g})"
            hf = cols.get(f"hf {cols[name]['dtype']}", {}).get(row)
            if hf and not name.startswith(("hf", "limits")):
                cell += f" **{c['median'] / hf['median']:.2f}x**"
            elif row == "transfer_ms" and not name.startswith("limits"):
                cell += f" **{c['min'] / cols['limits']['memcpy_ms']['min']:.1f}x memcpy**"
            elif row == "rpc_overhead_us" and not name.startswith("limits"):
                cell += f" **{c['median'] / cols['limits']['rpc_overhead_us']['median']:.2f}x echo**"
            cells.append(cell)
        label = labels.get(row, row.replace("_ms", " ms").replace("_", " "))
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="GGUF file or HF directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--tokens", type=int, default=128, help="decode steps per repeat")
    p.add_argument("--prefill", default="128,512", help="prompt lengths, comma-separated")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--planes", default="tcp,ipc,shm,doorbell")
    p.add_argument("--transfer-mb", type=float, default=10.0)
    p.add_argument("--no-privacy", action="store_true", help="skip the verify / otp columns")
    p.add_argument("--json", action="store_true", help="print the raw figures as JSON")
    args = p.parse_args(argv)
    for d in args.dtypes.split(","):
        if d not in WIRE_DTYPES:
            p.error(f"dtype {d!r}: choose from {tuple(WIRE_DTYPES)}")
    for plane in args.planes.split(","):
        if plane not in PLANES:
            p.error(f"plane {plane!r}: choose from {', '.join(PLANES)}")
    if args.tokens < 1 or args.repeats < 1:
        p.error("--tokens and --repeats must be at least 1")
    res = measure(args.model, args.tokens, [int(n) for n in args.prefill.split(",")], args.repeats,
                  tuple(args.dtypes.split(",")), tuple(args.planes.split(",")), args.transfer_mb,
                  privacy=not args.no_privacy)
    if args.json:
        print(json.dumps(res))
        return
    command = " ".join(["python -m bench", *(argv if argv is not None else sys.argv[1:])])
    print(f"`{command}`: {res['cores']} cores (hardware threads per core: {res['threads_per_core']}), "
          f"split: {res['trusted_threads']} trusted threads, OpenMP wait policy {res['wait_policy']}, "
          f"torch {res['torch']}, {res['repeats']} repeats, cells median (min), **ratio** to hf of the same dtype\n")
    print(format_table(res))
    print()
    for line in targets(res):
        print(f"- {line}")


if __name__ == "__main__":
    main()
