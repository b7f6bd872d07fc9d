"""Serving many users through the HTTP API: aggregate decode throughput and latencies at
1, 2, 4 and 8 concurrent streams, each as a ratio to the single stream, in one run.

    python -m bench serve [--streams 1,2,4,8] [--tokens 64] [--rounds 2] [--model PATH] [--json]

One `teegpu api` process (with its private GPU server) serves every level; each level runs
`rounds` waves of that many concurrent streaming chat requests (greedy, `ignore_eos`, so
every stream has exactly `tokens` tokens).
Per stream: time to first token (TTFT) and the gaps between streamed deltas (ITL).
Aggregate tokens/s = all completion tokens of a wave / the wave's wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import httpx

PROMPTS = ["Write a long story about a lighthouse keeper.", "Explain how rivers shape valleys, in detail.",
           "Describe a busy market in a port city.", "Tell the history of the printing press.",
           "Write a letter to a friend about a journey by train.", "Explain why leaves change colour.",
           "Describe the life of a bee colony through a year.", "Write an essay about mountains."]
READY = "teegpu api ready on "


def start_api(model: str | None, max_batch: int, *extra: str) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "teegpu.cli", "api", "--port", "0", "--max-batch", str(max_batch), *extra]
    if model:
        cmd += ["--model", model]
    return start_ready(cmd, READY)


def start_ready(cmd: list[str], ready: str) -> tuple[subprocess.Popen, str]:
    """Start a teegpu process; (it, the address its ready line names) once it prints that line."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:
        if line.startswith(ready):
            return proc, line[len(ready):].split()[0]
    raise RuntimeError(f"teegpu {cmd[3]} exited with {proc.wait()} before it was ready")


def one_stream(url: str, model_id: str, prompt: str, tokens: int, out: list) -> None:
    """Stream one chat completion; append (ttft_s, [gaps_s], completion tokens)."""
    body = {"model": model_id, "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = last = time.monotonic()
    ttft, gaps, used = None, [], 0
    for chunk in streamed_chunks(url, body):
        if chunk.get("usage"):
            used = chunk["usage"]["completion_tokens"]
        if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            now = time.monotonic()
            if ttft is None:
                ttft = now - start
            else:
                gaps.append(now - last)
            last = now
    out.append((ttft or 0.0, gaps, used))


def streamed_chunks(url: str, body: dict, http: httpx.Client | None = None):
    """The JSON chunks of one streamed chat completion, as they arrive (through `http` when given:
    a pinned client, say)."""
    with (http.stream("POST", url + "/v1/chat/completions", json=body) if http is not None else
          httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600)) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                yield json.loads(line[6:])


def wave(url: str, model_id: str, streams: int, tokens: int) -> dict:
    results: list = []
    threads = [threading.Thread(target=one_stream, args=(url, model_id, PROMPTS[i % len(PROMPTS)], tokens, results))
               for i in range(streams)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    return {"wall_s": wall, "tokens": sum(r[2] for r in results), "ttft": [r[0] for r in results],
            "gaps": [g for r in results for g in r[1]]}


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s)) - 1))] if s else float("nan")


def measure(levels: list[int], tokens: int, rounds: int, model: str | None) -> dict:
    proc, url = start_api(model, max(levels))
    try:
        model_id = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        wave(url, model_id, 1, 4)  # warm up
        rows = {}
        for n in levels:
            waves = [wave(url, model_id, n, tokens) for _ in range(rounds)]
            ttft = [t for w in waves for t in w["ttft"]]
            gaps = [g for w in waves for g in w["gaps"]]
            rows[n] = {"tokens_per_s": statistics.median(w["tokens"] / w["wall_s"] for w in waves),
                       "ttft_p50_ms": pct(ttft, 50) * 1000, "ttft_p95_ms": pct(ttft, 95) * 1000,
                       "itl_p50_ms": pct(gaps, 50) * 1000, "itl_p95_ms": pct(gaps, 95) * 1000,
                       "tokens": sum(w["tokens"] for w in waves)}
            print(f"\r{n} streams: {rows[n]['tokens_per_s']:.1f} tokens/s      ", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
    finally:
        proc.terminate()
        proc.wait(30)
    base = rows[levels[0]]
    for row in rows.values():
        row["ratio_tokens_per_s"] = row["tokens_per_s"] / base["tokens_per_s"]
        row["ratio_itl_p50"] = row["itl_p50_ms"] / base["itl_p50_ms"]
        row["ratio_ttft_p50"] = row["ttft_p50_ms"] / base["ttft_p50_ms"]
    return {"tokens": tokens, "rounds": rounds, "levels": rows}


def format_table(res: dict) -> str:
    lines = ["| streams | tokens/s (x 1 stream) | TTFT p50 / p95 ms (x) | ITL p50 / p95 ms (x) |",
             "|---|---|---|---|"]
    for n, r in res["levels"].items():
        lines.append(f"| {n} | {r['tokens_per_s']:.1f} ({r['ratio_tokens_per_s']:.2f}x) | "
                     f"{r['ttft_p50_ms']:.0f} / {r['ttft_p95_ms']:.0f} ({r['ratio_ttft_p50']:.2f}x) | "
                     f"{r['itl_p50_ms']:.1f} / {r['itl_p95_ms']:.1f} ({r['ratio_itl_p50']:.2f}x) |")
    top = res["levels"][max(res["levels"])]
    lines.append(f"\ntarget: aggregate tokens/s at {max(res['levels'])} streams >= 4x one stream: "
                 f"{top['ratio_tokens_per_s']:.2f}x ({'met' if top['ratio_tokens_per_s'] >= 4 else 'missed'})")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench serve", description=__doc__.splitlines()[0])
    p.add_argument("--streams", default="1,2,4,8", help="concurrency levels, comma-separated")
    p.add_argument("--tokens", type=int, default=64, help="completion tokens per stream")
    p.add_argument("--rounds", type=int, default=2, help="waves per level")
    p.add_argument("--model", help="GGUF file or HF directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    res = measure([int(n) for n in args.streams.split(",")], args.tokens, args.rounds, args.model)
    print(json.dumps(res, indent=1) if args.json else format_table(res))
