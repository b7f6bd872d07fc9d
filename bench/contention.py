"""Split decode against the in-process engine while an unrelated process keeps one core busy.

    python -m bench contention [--tokens 32] [--repeats 3] [--dtype float32] [--model PATH] [--json]

A TEE host is shared with other tenants. Both columns run in this one run, interleaved, first
with every core free and then with a busy-looping process started before the timed decodes and
stopped after them; the figure is split / in-process under the same load (target <= 1.5x).
In-process: the TEE-only engine with the same kernels and every core (LocalLinears). Split: a
server process over the shared-memory doorbell, configured as the `teegpu` command does.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import statistics
import time

import torch

from bench.suite import CORES, TEXT, engine_run
from teegpu.config import ServerConfig
from teegpu.model.loading import load_weights
from teegpu.model.tokenizer import load_tokenizer
from teegpu.protocol import WIRE_DTYPES
from teegpu.server_process import ServerProcess, private_endpoint
from teegpu.tee.engine import Engine, trusted_threads
from teegpu.tee.linears import LocalLinears


def _busy(stop) -> None:
    """The unrelated tenant: one core of pure computation until told to stop."""
    while not stop.is_set():
        for _ in range(100_000):
            pass


class BusyCore:
    def __enter__(self):
        ctx = multiprocessing.get_context("spawn")
        self.stop = ctx.Event()
        self.proc = ctx.Process(target=_busy, args=(self.stop,), daemon=True)
        self.proc.start()
        time.sleep(0.5)  # running before anything is timed
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.proc.join(10)


def measure(model, dtype: str, tokens: int, repeats: int) -> dict:
    weights, tok = load_weights(model), load_tokenizer(model)
    ids = tok.encode(TEXT.read_text())[:16]
    local = Engine(weights, tok, LocalLinears(weights, WIRE_DTYPES[dtype]), dtype=WIRE_DTYPES[dtype])
    server = ServerProcess(ServerConfig(model=model, endpoint=private_endpoint(), dtype=dtype))
    try:
        split = Engine.connect(weights, tok, server.wait_ready(), data_plane="shm")
        split.threads = trusted_threads()
        split.warm_up()
        local.warm_up()
        runs = {"in-process": engine_run(local, ids, [], tokens, CORES), "split": engine_run(split, ids, [], tokens, 1)}
        figures = {}
        for load in ("idle", "one core busy"):
            samples = {name: [] for name in runs}
            with BusyCore() if load != "idle" else contextlib.nullcontext():
                for r in range(repeats):
                    for name, run in runs.items():
                        out: dict = {}
                        run(out)
                        samples[name].append(out["decode_ms_per_token"])
                        print(f"\r{load}: repeat {r + 1}/{repeats} {name}", end="", flush=True)
            print()
            figures[load] = {name: statistics.median(v) for name, v in samples.items()}
            figures[load]["ratio"] = figures[load]["split"] / figures[load]["in-process"]
        split.close()
    finally:
        server.stop()
    return {"dtype": dtype, "tokens": tokens, "repeats": repeats, "cores": CORES,
            "kernels": local.kernels()["trusted"], "figures": figures}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench contention", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=sorted(WIRE_DTYPES))
    p.add_argument("--model")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(CORES)
    result = measure(args.model, args.dtype, args.tokens, args.repeats)
    if args.json:
        print(json.dumps(result))
        return
    print(f"`python -m bench contention --dtype {args.dtype} --tokens {args.tokens} --repeats {args.repeats}`: "
          f"{CORES} cores, ISA {result['kernels']['isa']}, decode ms/token, median of {args.repeats}\n")
    print("| load | in-process | split | split / in-process |\n|---|---|---|---|")
    for load, f in result["figures"].items():
        print(f"| {load} | {f['in-process']:.1f} | {f['split']:.1f} | **{f['ratio']:.2f}x** |")
