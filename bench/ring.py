"""The otp mode's exact ring products (teegpu.ring) of every served weight once, per ring kernel.

    python -m bench ring [--rows 1,32] [--repeats 5] [--threads 1] [--model PATH] [--json]

Random integer weights of the model's served shapes (the values do not change the work), under
the mmap threshold every model-loading process fixes (tensor_files), so that a buffer made
afresh per call costs what it costs in the server and the trusted side. Per kernel and row
count: the best pass over every weight, the LM head alone, and minor page faults per pass.
Kernels: float64 everywhere, int8 where the host runs it (`products.ring_kernel`).
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import torch

from teegpu.model.loading import load_weights
from teegpu.model.products import ring_kernel
from teegpu.model.tensor_files import return_large_frees_to_the_os
from teegpu.ring import RingWeight, ring_matmul


def measure(rows: list[int], repeats: int, model: str | None = None) -> dict:
    return_large_frees_to_the_os()
    shapes = list(load_weights(model, fingerprint=False).served_shapes().values())
    g = torch.Generator().manual_seed(0)
    out = {}
    for kernel in ["float64"] + (["int8"] if ring_kernel() == "int8" else []):
        print(f"{kernel}: laying out {len(shapes)} weights", file=sys.stderr, flush=True)
        weights = [RingWeight.of(torch.randint(-32000, 32000, s, dtype=torch.int16, generator=g), kernel)
                   for s in shapes]
        out[kernel] = {n: _passes(weights, n, repeats, g) for n in rows}
    return {"kernels": out, "host_kernel": ring_kernel(), "threads": torch.get_num_threads()}


def _passes(weights: list[RingWeight], rows: int, repeats: int, g: torch.Generator) -> dict:
    xs = {w.d_in: torch.randint(-2 ** 62, 2 ** 62, (rows, w.d_in), generator=g) for w in weights}
    outs = [torch.empty(rows, w.d_out, dtype=torch.int64) for w in weights]
    for w, o in zip(weights, outs):  # warm up: the kept buffers are made here
        ring_matmul(xs[w.d_in], w, o)
    best = head = float("inf")
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for i in range(repeats):
        start = time.perf_counter()
        for w, o in zip(weights, outs):
            ring_matmul(xs[w.d_in], w, o)
        best = min(best, time.perf_counter() - start)
        start = time.perf_counter()
        ring_matmul(xs[weights[-1].d_in], weights[-1], outs[-1])
        head = min(head, time.perf_counter() - start)
        print(f"\r{weights[0].kernel} {rows} rows: pass {i + 1}/{repeats}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / repeats
    return {"pass_ms": best * 1e3, "lm_head_ms": head * 1e3, "faults_per_pass": faults}


def format_table(res: dict) -> str:
    lines = [f"ring products, {res['threads']} thread(s); this host's kernel: {res['host_kernel']}", "",
             "| kernel | rows | every weight once, ms | LM head alone, ms | page faults a pass |",
             "|---|---|---|---|---|"]
    for kernel, by_rows in res["kernels"].items():
        for n, r in by_rows.items():
            lines.append(f"| {kernel} | {n} | {r['pass_ms']:.1f} | {r['lm_head_ms']:.2f} "
                         f"| {r['faults_per_pass']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench ring", description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,32", help="rows per product (1: a decode step), comma-separated")
    p.add_argument("--repeats", type=int, default=5, help="passes per row count (the best is reported)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the server's decode products: 1)")
    p.add_argument("--model", default=None, help="model whose served shapes to use (default: SmolLM2)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = measure([int(n) for n in args.rows.split(",")], args.repeats, args.model)
    print(json.dumps(res, indent=2) if args.json else format_table(res))
