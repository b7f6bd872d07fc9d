"""The seed's headline workload: a Llama-3.2-1B-shaped model, a 1024-token prefill and a short
decode, in plain float32, plain bfloat16 and otp, against monolithic transformers on the same
random weights, in one run.

    python -m bench seed [--shape llama-3.2-1b] [--prefill 1024] [--tokens 8]
                         [--modes float32,bfloat16,otp,otp+pad-server] [--device auto] [--threads N]
                         [--tensor-parallel 1,2] [--json]

The model is written once (seeded, `teegpu shaped-model`) under the cache directory. Each mode
runs in its own process (and its server in another), so that each process's peak RSS is its
own: load time, RPCs and bytes per forward, the prefill's time split, decode ms per token.
On a CPU-only machine every time is a CPU time; with --device cuda this is the GPU check
against the seed's 332 ms prefill (and its 10 ms target).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench import monolithic_env
from teegpu.config import EngineConfig, ShapedModelConfig
from teegpu.model.loading import cache_root, load_weights
from teegpu.model.tokenizer import load_tokenizer
from teegpu.options import rpcs_per_forward
from teegpu.telemetry.memory import peak_rss

TEXT = Path(__file__).with_name("sample_text.txt")
SEED_PREFILL_MS, SEED_RPCS, SEED_BYTES = 332.0, 98, 7.5e9  # the seed's Llama-3.2-1B figures (GPU)
MODES = {"float32": dict(dtype="float32"), "bfloat16": dict(dtype="bfloat16"),
         "otp": dict(dtype="float32", privacy="otp"), "otp+pad-server": dict(dtype="float32", privacy="otp")}


def shaped_model(shape: str, seed: int) -> Path:
    """The shaped model's directory, written on first use (about 15 s and 2.5 GB for the 1B)."""
    from teegpu.model.shaped import write_shaped_model

    out = cache_root() / "shaped" / f"{shape}-seed{seed}"
    if not (out / "config.json").is_file():
        print(f"writing the {shape} model (seed {seed}) to {out}", file=sys.stderr, flush=True)
        write_shaped_model(ShapedModelConfig(shape=shape, out=str(out), seed=seed))
    return out


def prompt_ids(tokenizer, n: int) -> list[int]:
    ids = tokenizer.encode(TEXT.read_text())
    return (ids * (n // len(ids) + 1))[:n]


@torch.inference_mode()
def run_split(model: str, mode: str, prefill: int, tokens: int, device: str, threads: int | None,
              tensor_parallel: int = 1) -> dict:
    """One mode of the split runtime, in this process (the trusted side) and a private server (of
    `tensor_parallel` ranks)."""
    from teegpu.tee.engine import Engine

    from teegpu.config import ServerConfig
    from teegpu.server_process import ServerProcess, private_endpoint

    t0 = time.monotonic()
    pad_server, extra, server = None, {}, None
    if mode == "otp+pad-server":  # a second otp server, started here, makes the pads' products
        pad_server = ServerProcess(ServerConfig(model=model, endpoint=private_endpoint(), device=device, privacy="otp"))
        extra = dict(pad_server=(pad_server.wait_ready(),), pads="server")
    if tensor_parallel > 1:  # started here: the engine starts single servers only
        server = ServerProcess(ServerConfig(model=model, endpoint=private_endpoint(), device=device,
                                            tensor_parallel=tensor_parallel, **MODES[mode]))
        extra["server"] = server.wait_ready()
    engine = Engine.open(EngineConfig(model=model, device=device, threads=threads, **MODES[mode], **extra))
    engine.server_process = engine.server_process or server
    out = {"load_s": time.monotonic() - t0}
    try:
        return measure_split(engine, out, prefill, tokens, pad_server)
    finally:
        for proc in (pad_server, server):
            if proc is not None:
                proc.stop()


def measure_split(engine, out: dict, prefill: int, tokens: int, pad_server) -> dict:
    """Prefill and decode timings (wall and this process's CPU time), RPCs, bytes and peak RSS."""
    ids = prompt_ids(engine.tokenizer, prefill)
    with engine:
        stats, tel = engine.client.stats, engine.telemetry
        pool = getattr(engine.linears, "pool", None)
        engine.forward(ids[:16], 0, engine.new_cache(16))  # warm-up: first-call costs stay out
        before = (stats.as_dict(), dict(tel.totals), pool.stats.stall_ms if pool else 0.0)
        cache = engine.new_cache(prefill + tokens + 1)
        t0, c0 = time.perf_counter(), time.process_time()
        token = int(engine.forward(ids, 0, cache)[-1].argmax())
        out["prefill_ms"] = (time.perf_counter() - t0) * 1000
        out["prefill_cpu_ms"] = (time.process_time() - c0) * 1000
        after = stats.as_dict()
        out["rpcs_per_forward"] = after["calls"] - before[0]["calls"]
        out["bytes_per_forward"] = (after["bytes_sent"] + after["bytes_received"]
                                    - before[0]["bytes_sent"] - before[0]["bytes_received"])
        server = tel.totals["server_compute_ms"] - before[1]["server_compute_ms"]
        rpc = tel.totals["total_ms"] - before[1]["total_ms"]
        pads = (pool.stats.stall_ms if pool else 0.0) - before[2]
        # pads an otp step had to make online (a 1024-row prefill outruns any pool) are not RPC time
        out["split_ms"] = {"server_compute": server, "transfer": rpc - server, "pads_online": pads,
                           "trusted": out["prefill_ms"] - rpc - pads}
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(tokens):
            token = int(engine.forward([token], prefill + i, cache)[-1].argmax())
        out["decode_ms_per_token"] = (time.perf_counter() - t0) * 1000 / tokens
        out["decode_cpu_ms_per_token"] = (time.process_time() - c0) * 1000 / tokens
        out["peak_rss_trusted"] = peak_rss()
        out["peak_rss_server"] = peak_rss(engine.server_process.proc.pid)
        if engine.hello.tensor_parallel > 1:  # each rank's own peak (rank 0 is the server process)
            out["peak_rss_ranks"] = [peak_rss(rank["pid"]) for rank in engine.hello.ranks]
            out["weight_bytes_ranks"] = [rank["weight_bytes"] for rank in engine.hello.ranks]
        if pad_server is not None:
            out["peak_rss_pad_server"] = peak_rss(pad_server.proc.pid)
    return out


@torch.inference_mode()
def run_monolithic(model: str, dtype: str, prefill: int, tokens: int, device: str) -> dict:
    from teegpu.model.reference import transformers_model
    from teegpu.protocol import WIRE_DTYPES

    ids = prompt_ids(load_tokenizer(model), prefill)
    dev = "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"
    t0 = time.monotonic()
    hf = transformers_model(model, WIRE_DTYPES[dtype]).to(dev)
    out = {"load_s": time.monotonic() - t0}
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    res = hf(torch.tensor([ids], device=dev), use_cache=True, logits_to_keep=1)
    sync()
    out["prefill_ms"] = (time.perf_counter() - t0) * 1000
    cache, token = res.past_key_values, int(res.logits[0, -1].argmax())
    t0 = time.perf_counter()
    for _ in range(tokens):
        res = hf(torch.tensor([[token]], device=dev), past_key_values=cache, use_cache=True)
        cache, token = res.past_key_values, int(res.logits[0, -1].argmax())
    out["decode_ms_per_token"] = (time.perf_counter() - t0) * 1000 / tokens
    out["peak_rss"] = peak_rss()
    return out


def in_child(args, what: str, mode: str, tensor_parallel: int = 1) -> dict:
    """Run one measurement in a fresh process (its own peak RSS); its last stdout line is JSON."""
    # `-m bench.seed`, not `-m bench`: the child keeps the environment it is given (bench/__init__.py)
    cmd = [sys.executable, "-m", "bench.seed", "--child", what, "--child-mode", mode, "--model", str(args.model),
           "--prefill", str(args.prefill), "--tokens", str(args.tokens), "--device", args.device,
           "--tensor-parallel", str(tensor_parallel)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    print(f"[{time.strftime('%H:%M:%S')}] {what} {mode}{f' tp{tensor_parallel}' if tensor_parallel > 1 else ''} ...",
          file=sys.stderr, flush=True)
    env = monolithic_env() if what == "monolithic" else None
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
    if done.returncode:
        return {"error": f"exit code {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(args) -> dict:
    weights = load_weights(args.model)  # headers (and the fingerprint): no tensor is kept
    res = {"model": Path(args.model).name, "prefill": args.prefill, "tokens": args.tokens, "device": args.device,
           "threads": args.threads, "cores": os.cpu_count(),
           "expected_rpcs": rpcs_per_forward(weights.config.num_layers),
           "parameters": sum(math.prod(t.shape) for parts in weights.tensors.values() for t in parts), "modes": {}}
    for mode in args.modes:
        hf_dtype = MODES[mode]["dtype"]
        if f"hf {hf_dtype}" not in res["modes"]:
            res["modes"][f"hf {hf_dtype}"] = in_child(args, "monolithic", hf_dtype)
        for ranks in getattr(args, "tensor_parallel", [1]):
            res["modes"][f"split {mode}" + (f" tp{ranks}" if ranks > 1 else "")] = in_child(args, "split", mode, ranks)
    return res


def format_table(res: dict) -> str:
    gib = 1 << 30
    lines = [f"{res['model']} ({res['parameters'] / 1e9:.2f} B parameters), prefill {res['prefill']} tokens, "
             f"decode {res['tokens']}, device {res['device']}, {res['cores']} cores",
             f"{'':18} {'load s':>7} {'prefill ms':>11} {'x hf':>6} {'decode ms/t':>12} {'x hf':>6} {'RPCs':>5} "
             f"{'GB/fwd':>7} {'RSS trusted':>12} {'RSS server':>11}"]
    for name, m in res["modes"].items():
        if "error" in m:
            lines.append(f"{name:18} {m['error']}")
            continue
        hf = res["modes"].get(f"hf {MODES.get(name.removeprefix('split ').split()[0], {}).get('dtype', '')}", {})
        ratio = (lambda k: f"{m[k] / hf[k]:.2f}" if name.startswith("split") and k in hf else "")
        rss_t = m.get("peak_rss_trusted", m.get("peak_rss", 0)) / gib
        rss_s = f"{m['peak_rss_server'] / gib:.2f} GiB" if "peak_rss_server" in m else ""
        rpcs = str(m.get("rpcs_per_forward", ""))
        gb = f"{m['bytes_per_forward'] / 1e9:.2f}" if "bytes_per_forward" in m else ""
        lines.append(f"{name:18} {m['load_s']:7.1f} {m['prefill_ms']:11.0f} {ratio('prefill_ms'):>6} "
                     f"{m['decode_ms_per_token']:12.1f} {ratio('decode_ms_per_token'):>6} {rpcs:>5} {gb:>7} "
                     f"{rss_t:8.2f} GiB {rss_s:>11}")
    lines.append("prefill time split (ms): " + "; ".join(
        f"{name}: " + ", ".join(f"{k} {v:.0f}" for k, v in m["split_ms"].items())
        for name, m in res["modes"].items() if "split_ms" in m))
    plain = res["modes"].get("split float32", {})
    lines.append("the trusted process's CPU time, prefill ms / decode ms per token (x the plain float32 split): " + "; ".join(
        f"{name}: {m['prefill_cpu_ms']:.0f} ({m['prefill_cpu_ms'] / plain['prefill_cpu_ms'] if plain else 0:.2f}x) / "
        f"{m['decode_cpu_ms_per_token']:.1f} ({m['decode_cpu_ms_per_token'] / plain['decode_cpu_ms_per_token'] if plain else 0:.2f}x)"
        for name, m in res["modes"].items() if "prefill_cpu_ms" in m))
    lines.extend(f"{name}: per rank, weights held " + ", ".join(f"{b / gib:.2f}" for b in m["weight_bytes_ranks"])
                 + " GiB, peak RSS " + ", ".join(f"{b / gib:.2f}" for b in m["peak_rss_ranks"]) + " GiB"
                 for name, m in res["modes"].items() if "peak_rss_ranks" in m)
    lines.append(f"the seed (Llama-3.2-1B, GPU): prefill {SEED_PREFILL_MS:.0f} ms, {SEED_RPCS} RPCs, "
                 f"{SEED_BYTES / 1e9:.1f} GB per forward; expected RPCs here {res['expected_rpcs']}")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench seed", description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-3.2-1b")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", help="another model (GGUF file or HF directory) instead of the shaped one")
    p.add_argument("--prefill", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--modes", default="float32,bfloat16,otp")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=int, help="torch threads of the trusted side (default: the engine's)")
    p.add_argument("--tensor-parallel", default="1", help="ranks of the split's server; a list (1,2) runs each")
    p.add_argument("--json", action="store_true")
    p.add_argument("--child", choices=("split", "monolithic"), help=argparse.SUPPRESS)
    p.add_argument("--child-mode", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child == "split":
        print(json.dumps(run_split(args.model, args.child_mode, args.prefill, args.tokens, args.device,
                                   args.threads, int(args.tensor_parallel))))
        return
    if args.child == "monolithic":
        print(json.dumps(run_monolithic(args.model, args.child_mode, args.prefill, args.tokens, args.device)))
        return
    args.modes = [m for m in args.modes.split(",") if m]
    args.tensor_parallel = [int(n) for n in args.tensor_parallel.split(",") if n]
    unknown = [m for m in args.modes if m not in MODES]
    if unknown:
        p.error(f"unknown modes {unknown}: choose from {list(MODES)}")
    args.model = args.model or str(shaped_model(args.shape, args.seed))
    res = measure(args)
    print(json.dumps(res, indent=1) if args.json else format_table(res))


if __name__ == "__main__":
    main()
