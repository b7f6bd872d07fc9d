"""Multi-turn chat through the HTTP API, with and without the prefix cache, side by side: each
turn's time to first token (TTFT), the last turn's as a ratio.

    python -m bench chat [--turns 6] [--user-chars 900] [--answer 48] [--privacy plain,otp] [--json]

Per privacy mode, two `teegpu api` processes (each with its private GPU server), one with
`--no-prefix-cache`, get the same conversation: every turn re-sends the history, as a chat client
does, plus a new user message of about `user-chars` characters of bench/sample_text.txt. Both
conversations carry the first server's answers (greedy, `ignore_eos`), so the prompts are equal.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import httpx

from bench.serve import start_api, streamed_chunks

TEXT = (Path(__file__).parent / "sample_text.txt").read_text()


def user_message(turn: int, chars: int) -> str:
    start = (turn * chars) % len(TEXT)
    part = (TEXT + TEXT)[start:start + chars]
    return f"Part {turn + 1} of my notes follows. Read it; I will ask about it.\n\n{part}"


def ask(url: str, model_id: str, messages: list, answer: int) -> tuple[float, str, dict]:
    """Stream one turn: (TTFT in seconds, the answer, the usage)."""
    body = {"model": model_id, "messages": messages, "max_tokens": answer, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start, ttft, text, used = time.monotonic(), None, [], {}
    for chunk in streamed_chunks(url, body):
        used = chunk.get("usage") or used
        if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            ttft = ttft or time.monotonic() - start
            text.append(chunk["choices"][0]["delta"]["content"])
    return ttft or 0.0, "".join(text), used


def conversation(privacy: str, turns: int, chars: int, answer: int, model: str | None) -> dict:
    extra = ["--privacy", privacy]
    servers = {name: start_api(model, 1, *extra, *flags) for name, flags in
               (("cached", []), ("uncached", ["--no-prefix-cache"]))}
    try:
        model_id = httpx.get(servers["cached"][1] + "/v1/models").json()["data"][0]["id"]
        for _, url in servers.values():  # warm up
            ask(url, model_id, [{"role": "user", "content": "Hi"}], 2)
        messages, rows = [], []
        for turn in range(turns):
            messages.append({"role": "user", "content": user_message(turn, chars)})
            row = {"turn": turn + 1}
            for name, (_, url) in servers.items():
                ttft, text, used = ask(url, model_id, messages, answer)
                row[f"{name}_ttft_ms"] = ttft * 1000
                row[f"{name}_cached_tokens"] = used["prompt_tokens_details"]["cached_tokens"]
                row["prompt_tokens"] = used["prompt_tokens"]
                if name == "cached":
                    reply = text
            row["ratio"] = row["cached_ttft_ms"] / row["uncached_ttft_ms"]
            rows.append(row)
            messages.append({"role": "assistant", "content": reply})
            print(f"\r{privacy}: turn {turn + 1}/{turns}, {row['prompt_tokens']} prompt tokens", end="",
                  file=sys.stderr, flush=True)
        print(file=sys.stderr)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(30)
    return {"privacy": privacy, "turns": rows, "last_turn_ratio": rows[-1]["ratio"]}


def format_table(results: list[dict]) -> str:
    lines = ["| privacy | turn | prompt tokens | cached tokens | TTFT with cache ms | without ms | ratio |",
             "|---|---|---|---|---|---|---|"]
    for res in results:
        for r in res["turns"]:
            lines.append(f"| {res['privacy']} | {r['turn']} | {r['prompt_tokens']} | {r['cached_cached_tokens']} | "
                         f"{r['cached_ttft_ms']:.0f} | {r['uncached_ttft_ms']:.0f} | {r['ratio']:.2f}x |")
    for res in results:
        ok = "met" if res["last_turn_ratio"] <= 0.25 else "missed"
        lines.append(f"\n{res['privacy']}: last turn's TTFT with the prefix cache {res['last_turn_ratio']:.2f}x "
                     f"of without (target <= 0.25x: {ok})")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench chat", description=__doc__.splitlines()[0])
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--user-chars", type=int, default=900, help="characters of each new user message")
    p.add_argument("--answer", type=int, default=48, help="tokens of each answer")
    p.add_argument("--privacy", default="plain,otp", help="privacy modes, comma-separated")
    p.add_argument("--model", help="GGUF file or HF directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    results = [conversation(mode, args.turns, args.user_chars, args.answer, args.model)
               for mode in args.privacy.split(",")]
    print(json.dumps(results, indent=1) if args.json else format_table(results))
