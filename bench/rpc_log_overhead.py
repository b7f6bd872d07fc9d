"""What writing the per-RPC log costs: decode with and without --rpc-log, interleaved.

    python -m bench.rpc_log_overhead [--tokens 64] [--repeats 5] [--json]

One server, one engine; runs alternate log off / log on so that machine noise hits
both alike. Reports min and median decode ms/token of each and the median ratio.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from teegpu.config import ServerConfig
from teegpu.server_process import ServerProcess, private_endpoint
from teegpu.tee.engine import Engine, EngineConfig, GenerationConfig


def measure(tokens: int, repeats: int, model: str | None) -> dict:
    gen = GenerationConfig(max_new_tokens=tokens, stop_at_eos=False)
    times = {"off": [], "on": []}
    with ServerProcess(ServerConfig(model=model, endpoint=private_endpoint())) as server, \
            tempfile.TemporaryDirectory() as tmp:
        engine = Engine.open(EngineConfig(model=model, server=server.wait_ready()))
        engine.generate("Warm up.", GenerationConfig(max_new_tokens=8))
        for i in range(repeats):
            for mode in ("off", "on"):
                if mode == "on":
                    engine.telemetry.open(str(Path(tmp) / f"log{i}.jsonl"), {"model": str(model)})
                result = engine.generate("Write a long story about a lighthouse keeper.", gen, chat=True)
                engine.telemetry.close()
                times[mode].append(result.timings["decode_ms_per_token"])
                print(f"\rrepeat {i + 1}/{repeats} log {mode}: {times[mode][-1]:.1f} ms/token   ",
                      end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        engine.close()
    ratios = [on / off for on, off in zip(times["on"], times["off"])]
    return {"tokens": tokens, "repeats": repeats, "times_ms_per_token": times,
            "decode_ms_per_token": {m: {"min": min(v), "median": statistics.median(v)} for m, v in times.items()},
            "median_ratio_on_off": statistics.median(ratios),
            "min_ratio_on_off": min(times["on"]) / min(times["off"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--model")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    res = measure(args.tokens, args.repeats, args.model)
    if args.json:
        print(json.dumps(res))
        return
    d = res["decode_ms_per_token"]
    print(f"decode ms/token over {res['tokens']} tokens, {res['repeats']} interleaved repeats")
    print(f"{'':12}{'min':>10}{'median':>10}")
    for mode in ("off", "on"):
        print(f"log {mode:<8}{d[mode]['min']:>10.2f}{d[mode]['median']:>10.2f}")
    print(f"ratio on/off: median of pairs {res['median_ratio_on_off']:.3f}, of minima {res['min_ratio_on_off']:.3f}")


if __name__ == "__main__":
    main()
