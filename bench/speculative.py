"""Speculative decoding (prompt lookup) against plain decoding, side by side in one process, on
the split (a private GPU server): decode tokens/s at batch 1 on a grounded task and on a chat with
nothing to copy, and aggregate tokens/s of 8 streams batched together.

    python -m bench speculative [--tokens 160] [--repeats 3] [--k 4] [--text-chars 1800] [--model PATH] [--json]

Greedy throughout, so both sides produce the same tokens; the runs alternate (plain, then
speculative) so that a noisy neighbour slows both.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from bench.serve import PROMPTS  # the serving bench's eight chat prompts
from teegpu.config import EngineConfig, GenerationConfig, SchedulerConfig, SpeculativeConfig

TEXT = (Path(__file__).parent / "sample_text.txt").read_text()
GROUNDED = ("Rewrite the following text, changing only the word 'lighthouse' to 'beacon' wherever it appears, "
            "and nothing else:\n\n")
CHAT = "Write a short poem about autumn leaves."



def batch_tokens_per_s(engine, speculative, tokens: int) -> tuple[float, list, dict]:
    from teegpu.tee.scheduler import Scheduler

    scheduler = Scheduler(engine, SchedulerConfig(max_batch=8, prefix_cache=False), speculative)
    gen = GenerationConfig(max_new_tokens=tokens, stop_at_eos=False)
    start = time.perf_counter()
    seqs = [scheduler.submit(engine.encode([{"role": "user", "content": p}], chat=True), gen) for p in PROMPTS]
    while scheduler.step():
        pass
    stats = scheduler.speculation.as_dict() if speculative else {}
    return sum(len(s.out) for s in seqs) / (time.perf_counter() - start), [s.out for s in seqs], stats


def measure(model: str | None, tokens: int, repeats: int, k: int, text_chars: int = 1800) -> dict:
    from teegpu.tee.engine import Engine

    ngram = SpeculativeConfig(speculative="ngram", num_speculative_tokens=k)
    cases = {"grounded": (GROUNDED + TEXT[:text_chars], tokens), "chat": (CHAT, 64)}
    rows = {name: {"plain": [], "ngram": [], "stats": {}} for name in (*cases, "batch of 8")}
    with Engine.open(EngineConfig(model=model), warm_up=True) as engine:
        for r in range(repeats):
            for name, (prompt, n) in cases.items():
                gen = GenerationConfig(max_new_tokens=n, stop_at_eos=False)
                plain = engine.generate([{"role": "user", "content": prompt}], gen, chat=True)
                fast = engine.generate([{"role": "user", "content": prompt}], gen, chat=True, speculative=ngram)
                assert fast.token_ids == plain.token_ids, f"{name}: speculation changed the greedy tokens"
                rows[name]["plain"].append(1000 / plain.timings["decode_ms_per_token"])
                rows[name]["ngram"].append(1000 / fast.timings["decode_ms_per_token"])
                rows[name]["stats"] = fast.speculation
            plain_tps, plain_out, _ = batch_tokens_per_s(engine, None, 48)
            fast_tps, fast_out, rows["batch of 8"]["stats"] = batch_tokens_per_s(engine, ngram, 48)
            assert fast_out == plain_out, "batch of 8: speculation changed the greedy tokens"
            rows["batch of 8"]["plain"].append(plain_tps)
            rows["batch of 8"]["ngram"].append(fast_tps)
            print(f"\rrepeat {r + 1}/{repeats}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    for row in rows.values():
        row["plain_tokens_per_s"] = statistics.median(row["plain"])
        row["ngram_tokens_per_s"] = statistics.median(row["ngram"])
        row["ratio"] = row["ngram_tokens_per_s"] / row["plain_tokens_per_s"]
    return {"tokens": tokens, "repeats": repeats, "k": k, "cases": rows}


TARGETS = {"grounded": (">=", 1.8), "chat": (">=", 0.95), "batch of 8": (">=", 1.0)}


def format_table(res: dict) -> str:
    lines = ["| case | plain tokens/s | ngram tokens/s | ratio | kept / drafted | tokens per step | target |",
             "|---|---|---|---|---|---|---|"]
    for name, r in res["cases"].items():
        s = r["stats"]
        kept = f"{s['accepted']} / {s['drafted']}" if s else "-"
        per_step = f"{s['tokens_per_step']:.2f}" if s else "-"
        op, bound = TARGETS[name]
        met = "met" if r["ratio"] >= bound else "missed"
        lines.append(f"| {name} | {r['plain_tokens_per_s']:.1f} | {r['ngram_tokens_per_s']:.1f} | "
                     f"{r['ratio']:.2f}x | {kept} | {per_step} | {op} {bound}x: {met} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench speculative", description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=160, help="tokens of the grounded task's answer")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--k", type=int, default=4, help="--num-speculative-tokens")
    p.add_argument("--text-chars", type=int, default=1800, help="characters of the grounded task's text "
                   "(1800: about 400 tokens)")
    p.add_argument("--model", help="GGUF file or HF directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    res = measure(args.model, args.tokens, args.repeats, args.k, args.text_chars)
    print(json.dumps(res, indent=1) if args.json else format_table(res))
