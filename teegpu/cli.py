"""The `teegpu` command: a thin layer that parses into config dataclasses and calls the API."""
from __future__ import annotations

import argparse
import json
import sys

from teegpu.errors import TeegpuError
from teegpu.protocol import WIRE_DTYPES
from teegpu.server.linear_server import DEVICES, PRIVACY_MODES, ServerConfig
from teegpu.transport import DATA_PLANES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="teegpu", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the untrusted GPU server (linear layers only)")
    s.add_argument("--model", help="GGUF file or HF directory (default: SmolLM2-135M-Instruct)")
    s.add_argument("--endpoint", default="tcp://127.0.0.1:5555", help="tcp://HOST:PORT or ipc:///PATH")
    s.add_argument("--device", choices=DEVICES, default="auto")
    s.add_argument("--dtype", choices=tuple(WIRE_DTYPES), default="float32", help="weights and wire dtype")
    s.add_argument("--data-plane", choices=DATA_PLANES, default="shm",
                   help="shm (default): clients on this host may pass tensors through /dev/shm; socket: refuse")
    s.add_argument("--privacy", choices=PRIVACY_MODES, default="plain",
                   help="otp: int16 weights, accept only one-time-padded int64 activations")
    s.add_argument("--curve-secret", metavar="KEY_SECRET", help="CURVE: this server's NAME.key_secret")
    s.add_argument("--curve-allow", metavar="DIR", help="CURVE: directory of the client public keys to accept")
    s.add_argument("--busy-poll-us", type=int, default=0,
                   help="after each reply, poll this long without sleeping (pays on hosts with idle cores)")

    g = sub.add_parser("generate", help="generate text on the trusted side, linears on the server")
    g.add_argument("prompt")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--model", help="GGUF file or HF directory (default: SmolLM2-135M-Instruct)")
    g.add_argument("--server", help="endpoint of a running server (default: start a private one)")
    g.add_argument("--local", action="store_true", help="TEE-only baseline: no server, compute everything here")
    g.add_argument("--dtype", choices=tuple(WIRE_DTYPES), default="float32", help="dtype of the started server")
    g.add_argument("--device", choices=DEVICES, default="auto", help="device of the started server")
    g.add_argument("--data-plane", choices=DATA_PLANES, default="shm",
                   help="shm: tensors through /dev/shm when the server is on this host; socket: in the messages")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int)
    g.add_argument("--timeout-ms", type=int, default=60_000, help="deadline of each request")
    g.add_argument("--threads", type=int, help="torch threads of the trusted side (default: 1 with a server)")
    g.add_argument("--offload-attention", action="store_true", help="plaintext Q*K^T and P*V on the server")
    g.add_argument("--privacy", choices=PRIVACY_MODES, default="plain",
                   help="otp: the server sees only one-time-padded integers (docs/security.md)")
    g.add_argument("--verify", action="store_true", help="Freivalds' check on every product the server returns")
    g.add_argument("--mask-pool-rows", type=int, default=32, help="otp: pads precomputed per weight")
    g.add_argument("--model-sha256", metavar="HEX", help="refuse a model file with another SHA-256")
    g.add_argument("--curve-secret", metavar="KEY_SECRET", help="CURVE to --server: this client's NAME.key_secret")
    g.add_argument("--curve-server-key", metavar="KEY", help="CURVE: the pinned server's public NAME.key")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    g.add_argument("--rpc-log", metavar="PATH", help="write one JSON Lines record per RPC (teegpu analyze reads it)")
    k = sub.add_parser("keys", help="generate a CURVE key pair: NAME.key (public) and NAME.key_secret")
    k.add_argument("directory")
    k.add_argument("--name", default="teegpu", help="file name stem (e.g. server, client-1)")
    a = sub.add_parser("analyze", help="statistics, findings and charts from an --rpc-log file")
    a.add_argument("log")
    a.add_argument("--json", action="store_true", help="print the analysis as JSON")
    a.add_argument("--plot", metavar="FILE.png", help="write the time breakdown and a call timeline")
    a.add_argument("--top", type=int, default=5, help="how many slowest / largest calls to list")
    a.add_argument("--follow", action="store_true", help="print a live summary while a run writes the log")
    a.add_argument("--idle-exit-s", type=float, help="with --follow: stop after this long without new records")
    return p


def run_analyze(args) -> int:
    from teegpu.telemetry.analyze import analyze, follow, format_report, read_log, to_json

    if args.follow:
        follow(args.log, idle_exit_s=args.idle_exit_s)
    data = read_log(args.log)
    report = analyze(data, top=args.top)
    print(to_json(report) if args.json else format_report(report))
    if args.plot:
        from teegpu.telemetry.charts import plot

        plot(data.records, data.run, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def run_serve(args) -> int:
    from teegpu.server.linear_server import serve

    serve(ServerConfig(model=args.model, endpoint=args.endpoint, device=args.device, dtype=args.dtype,
                       data_plane=args.data_plane, busy_poll_us=args.busy_poll_us, privacy=args.privacy,
                       curve_secret=args.curve_secret, curve_allow=args.curve_allow))
    return 0


def run_generate(args) -> int:
    from teegpu.tee.engine import Engine, EngineConfig, GenerationConfig

    config = EngineConfig(model=args.model, server=args.server, local=args.local, dtype=args.dtype,
                          device=args.device, data_plane=args.data_plane, timeout_ms=args.timeout_ms, offload_attention=args.offload_attention,
                          rpc_log=args.rpc_log, threads=args.threads, privacy=args.privacy, verify=args.verify,
                          mask_pool_rows=args.mask_pool_rows, model_sha256=args.model_sha256,
                          curve_secret=args.curve_secret, curve_server_key=args.curve_server_key)
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                           top_k=args.top_k, seed=args.seed)
    on_text = None if args.json else (lambda t: (sys.stdout.write(t), sys.stdout.flush()))
    with Engine.open(config) as engine:
        result = engine.generate(args.prompt, gen, chat=args.chat, on_text=on_text)
        if not args.json:
            print(flush=True)  # end the streamed line before the server's exit message
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        t, r = result.timings, result.rpc
        print(f"[{len(result.token_ids)} tokens, {result.finish_reason}; prefill {t['prefill_ms']:.0f} ms, "
              f"decode {t['decode_ms_per_token'] or 0:.1f} ms/token; {r.get('calls', 0)} RPCs]", file=sys.stderr)
        if r.get("breakdown_ms"):
            b = r["breakdown_ms"]
            parts = ", ".join(f"{k.removesuffix('_ms')} {v:.0f}" for k, v in b.items() if k != "total_ms")
            print(f"[RPC time {b['total_ms']:.0f} ms: {parts}; {(r['bytes_sent'] + r['bytes_received']) / 1e6:.1f} MB]",
                  file=sys.stderr)
    return 0


def run_keys(args) -> int:
    from teegpu.transport import generate_keys

    public, secret = generate_keys(args.directory, args.name)
    print(f"wrote {public} (public: give it to the peer) and {secret} (secret: keep it, mode 0600)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"serve": run_serve, "generate": run_generate, "analyze": run_analyze, "keys": run_keys}[args.command](args)
    except TeegpuError as e:
        print(f"teegpu: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
