"""What the local proxy costs: the same streamed chat requests straight to a `teegpu api --tls`
(over a client pinned to its key, as `attested_openai` makes one) and through `teegpu proxy`,
alternating, in one run: time to first token (TTFT) and the whole answer's time, as ratios.

    python -m bench proxy [--streams 1,4] [--requests 6] [--tokens 32] [--model PATH] [--json]

No TEE here: the server runs `--attestation none` and the proxy `--insecure-no-attestation` (it
still pins the key it saw), so what is measured is the extra hop: loopback HTTP to the proxy,
its TLS connection to the upstream, and the relay of each chunk. Each round sends `streams`
concurrent requests one way, then the other; medians over `requests` rounds.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time

import httpx

from bench.serve import PROMPTS, start_api, start_ready, streamed_chunks

READY = "teegpu proxy ready on "


def start_proxy(upstream: str) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "teegpu.cli", "proxy", "--upstream", upstream, "--listen", "127.0.0.1:0",
           "--insecure-no-attestation"]
    return start_ready(cmd, READY)


def timed_stream(http: httpx.Client, url: str, model_id: str, prompt: str, tokens: int, out: list) -> None:
    """Append (TTFT s, whole answer s, the answer) of one streamed greedy chat completion."""
    body = {"model": model_id, "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
            "temperature": 0, "ignore_eos": True, "stream": True}
    start, ttft, text = time.monotonic(), None, []
    for chunk in streamed_chunks(url, body, http):
        if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            ttft = ttft or time.monotonic() - start
            text.append(chunk["choices"][0]["delta"]["content"])
    out.append((ttft or 0.0, time.monotonic() - start, "".join(text)))


def wave(http: httpx.Client, url: str, model_id: str, streams: int, tokens: int) -> list:
    results: list = []
    threads = [threading.Thread(target=timed_stream, args=(http, url, model_id, PROMPTS[i % len(PROMPTS)], tokens,
                                                           results)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(results, key=lambda r: r[2])


def measure(levels: list[int], requests: int, tokens: int, model: str | None) -> dict:
    from teegpu.client import pinned_context, verify_server
    from teegpu.config import VerifyConfig

    api, upstream = start_api(model, max(levels), "--tls", "--attestation", "none")
    proxy, local = start_proxy(upstream)
    try:
        pin = verify_server(upstream, VerifyConfig(insecure_no_attestation=True)).spki_sha256
        with httpx.Client(verify=pinned_context(pin), timeout=600) as direct, httpx.Client(timeout=600) as plain:
            model_id = direct.get(upstream + "/v1/models").json()["data"][0]["id"]
            ways = {"direct": (direct, upstream), "proxy": (plain, local)}
            for http, url in ways.values():
                wave(http, url, model_id, 1, 2)  # warm up: connections, the first prefill
            return {"tokens": tokens, "requests": requests,
                    "levels": {n: level(ways, model_id, n, requests, tokens) for n in levels}}
    finally:
        for proc in (proxy, api):
            proc.terminate()
            proc.wait(30)


def level(ways: dict, model_id: str, streams: int, requests: int, tokens: int) -> dict:
    got: dict = {name: [] for name in ways}
    for i in range(requests):
        for name, (http, url) in ways.items():
            answers = wave(http, url, model_id, streams, tokens)
            got[name].append(answers)
        if [a[2] for a in got["direct"][-1]] != [a[2] for a in got["proxy"][-1]]:
            raise AssertionError("the proxy's answers differ from the direct ones")
        print(f"\r{streams} streams: round {i + 1}/{requests}   ", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    row = {}
    for name, rounds in got.items():
        row[f"{name}_ttft_ms"] = statistics.median(a[0] for r in rounds for a in r) * 1000
        row[f"{name}_total_ms"] = statistics.median(a[1] for r in rounds for a in r) * 1000
    row["ratio_ttft"] = row["proxy_ttft_ms"] / row["direct_ttft_ms"]
    row["ratio_total"] = row["proxy_total_ms"] / row["direct_total_ms"]
    return row


def format_table(res: dict) -> str:
    lines = [f"{res['tokens']} tokens per answer, medians of {res['requests']} rounds, direct and proxy alternating",
             "| streams | TTFT direct ms | TTFT proxy ms | x | answer direct ms | answer proxy ms | x |",
             "|---|---|---|---|---|---|---|"]
    for n, r in res["levels"].items():
        lines.append(f"| {n} | {r['direct_ttft_ms']:.1f} | {r['proxy_ttft_ms']:.1f} | {r['ratio_ttft']:.2f}x | "
                     f"{r['direct_total_ms']:.0f} | {r['proxy_total_ms']:.0f} | {r['ratio_total']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench proxy", description=__doc__.splitlines()[0])
    p.add_argument("--streams", default="1,4", help="concurrent requests per round, comma-separated")
    p.add_argument("--requests", type=int, default=6, help="rounds per level")
    p.add_argument("--tokens", type=int, default=32, help="completion tokens per answer")
    p.add_argument("--model", help="GGUF file or HF directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    res = measure([int(n) for n in args.streams.split(",")], args.requests, args.tokens, args.model)
    print(json.dumps(res, indent=1) if args.json else format_table(res))
