"""What tensor parallelism costs per RPC: a 2-rank server (each fan-out) against a single server,
measured one after the other in one run, same client, same ops.

    python -m bench tensor-parallel [--calls 200] [--ranks 2] [--rows 1,256] [--model PATH] [--json]

Per op and row count: the median round trip and the server's own time (for a tensor-parallel
server rank 0's whole fan-out, products and gather: the wire cost is the round trip less that).
On a CPU host this is not a speed-up (the ranks share the cores); it measures what the fan-out
and the gather add to each request.
"""
from __future__ import annotations

import argparse
import json
import sys

from bench.rpc_round_trip import measure

FAN_OUTS = ("shm", "broadcast")


def run(calls: int, ranks: int, rows: list[int], model: str | None) -> dict:
    configs = {"single": {}} | {f"tp{ranks} {fan}": dict(tensor_parallel=ranks, tp_fan_out=fan) for fan in FAN_OUTS}
    res = {"calls": calls, "ranks": ranks, "servers": {}}
    for n in rows:
        for name, kw in configs.items():
            print(f"{name}, {n} row(s):", file=sys.stderr, flush=True)
            res["servers"][f"{name} T={n}"] = measure(calls, "ipc", model, "shm", n, **kw)["median"]
    return res


def format_table(res: dict) -> str:
    lines = [f"median over {res['calls']} calls (shm data plane, doorbell); ms",
             f"{'server':<22}{'op':<9}{'round trip':>11}{'server':>9}{'extra vs single':>17}"]
    for name, ops in res["servers"].items():
        single = res["servers"][f"single {name.split()[-1]}"]
        for op, r in ops.items():
            extra = r["round_trip_ms"] - single[op]["round_trip_ms"]
            lines.append(f"{name:<22}{op:<9}{r['round_trip_ms']:>11.3f}{r['server_compute_ms']:>9.3f}"
                         f"{'' if name.startswith('single') else f'{extra:+.3f}':>17}")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench tensor-parallel", description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--rows", default="1,256", help="rows per request, a list")
    p.add_argument("--model")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    res = run(args.calls, args.ranks, [int(n) for n in args.rows.split(",") if n], args.model)
    print(json.dumps(res, indent=1) if args.json else format_table(res))


if __name__ == "__main__":
    main()
