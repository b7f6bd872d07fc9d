"""Round trip of each op for one decode token (T=1) against the server's own compute time.

    python -m bench.rpc_round_trip [--calls 200] [--transport ipc|tcp] [--json]

The difference between the two columns is the fixed per-call cost of the split: client
serialisation, libzmq, the wire, wake-ups, and the server's parse and reply.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from teegpu.protocol import Hello, Op
from teegpu.config import ServerConfig
from teegpu.server_process import ServerProcess, private_endpoint
from teegpu.transport import RpcClient


def measure(calls: int, transport: str, model: str | None, data_plane: str = "socket", rows_per_call: int = 1,
            **server: object) -> dict:
    """Median round trip and server compute per op; `server`: more ServerConfig fields (tensor_parallel)."""
    endpoint = private_endpoint() if transport == "ipc" else "tcp://127.0.0.1:*"
    rows = {}
    with ServerProcess(ServerConfig(model=model, endpoint=endpoint, **server)) as server_process:
        client = RpcClient(server_process.wait_ready(), data_plane=data_plane)
        cfg = Hello.from_bytes(client.call(Op.HELLO, 0).payload).config
        h = cfg["hidden_size"]
        ops = {Op.QKV: h, Op.O: cfg["num_heads"] * cfg["head_dim"], Op.GATE_UP: h,
               Op.DOWN: cfg["intermediate_size"], Op.LM_HEAD: h}
        for n, (op, d_in) in enumerate(ops.items()):
            layer, x = (-1 if op == Op.LM_HEAD else 0), torch.randn(rows_per_call, d_in)
            for _ in range(20):
                client.call(op, layer, [x])
            total, compute = [], []
            for _ in range(calls):
                t0 = time.perf_counter_ns()
                head = client.call(op, layer, [x]).header
                total.append((time.perf_counter_ns() - t0) / 1e6)
                compute.append(head.compute_ns / 1e6)
            rows[op.name] = {"round_trip_ms": statistics.median(total), "server_compute_ms": statistics.median(compute)}
            print(f"\rop {n + 1}/{len(ops)}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        client.close()
    return {"transport": transport, "calls": calls, "median": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--transport", choices=("ipc", "tcp"), default="ipc")
    p.add_argument("--model")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    res = measure(args.calls, args.transport, args.model)
    if args.json:
        print(json.dumps(res))
        return
    print(f"median over {res['calls']} calls, T=1, {res['transport']}")
    print(f"{'op':<10}{'round trip ms':>15}{'server compute ms':>19}{'overhead ms':>13}")
    for op, r in res["median"].items():
        print(f"{op:<10}{r['round_trip_ms']:>15.3f}{r['server_compute_ms']:>19.3f}"
              f"{r['round_trip_ms'] - r['server_compute_ms']:>13.3f}")


if __name__ == "__main__":
    main()
