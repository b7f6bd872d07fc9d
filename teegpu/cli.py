"""The `teegpu` command: a thin layer that parses into the config dataclasses and calls the API.

Each command's flags are generated from its dataclasses (teegpu.config); the few that are
the command's own (a prompt, output format) are listed in COMMAND_FLAGS.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys

from teegpu.config import (
    ApiConfig, EngineConfig, GenerationConfig, ProxyConfig, SchedulerConfig, ServerConfig, ShapedModelConfig,
    SpeculativeConfig, VerifyConfig, add_arguments, from_args,
)
from teegpu.errors import TeegpuError
from teegpu.options import let_idle_workers_sleep, under_gramine

# which dataclasses a command's flags come from; the server's must not load the trusted side
COMMAND_CONFIGS = {
    "serve": (ServerConfig,),
    "generate": (EngineConfig, GenerationConfig, SpeculativeConfig),
    "api": (ApiConfig, EngineConfig, SchedulerConfig, SpeculativeConfig),
    "shaped-model": (ShapedModelConfig,),
    "verify": (VerifyConfig,),
    "proxy": (ProxyConfig, VerifyConfig),
}
# the flags of a command that belong to no dataclass (checked by tests/test_cli_flags_match_configs.py)
COMMAND_FLAGS = {"serve": set(), "generate": {"prompt", "chat", "json"}, "api": set(), "shaped-model": set(),
                 "verify": {"url", "json"}, "proxy": set()}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="teegpu", description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true", help="print a traceback on errors (or TEEGPU_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True)
    helps = {"serve": "run the untrusted GPU server (linear layers only)",
             "generate": "generate text on the trusted side, linears on the server",
             "api": "serve the OpenAI-compatible HTTP API from the trusted side, many users at once",
             "shaped-model": "write a random-weight model of a named LLaMA shape (benchmarks at real sizes)",
             "verify": "check a teegpu api --tls server's TEE quote, key, measurement and model",
             "proxy": "verify a teegpu api --tls server, then serve it as plain OpenAI API (and a chat page) "
                      "on localhost"}
    for name, configs in COMMAND_CONFIGS.items():
        s = sub.add_parser(name, help=helps[name])
        if name == "verify":
            s.add_argument("url", help="https://HOST:PORT of a teegpu api --tls")
            s.add_argument("--json", action="store_true", help="print what was verified as JSON")
        if name == "generate":
            s.add_argument("prompt")
            s.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
            s.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
        for cls in configs:
            add_arguments(s.add_argument_group(cls.__doc__.strip().splitlines()[0].rstrip(".")), cls)

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

    serve(from_args(ServerConfig, args))
    return 0


@contextlib.contextmanager
def early_server(config: EngineConfig):
    """The private GPU server, started before this process imports torch: it loads while we do
    (about 2 s sooner ready on an AMD EPYC family 25). None with --server, --local or in Gramine
    (where Engine.open says why). The engine stops it too; leaving the block covers failures
    before the engine has it."""
    from teegpu.server_process import private_server

    server = None if under_gramine() else private_server(config)
    try:
        yield server
    finally:
        if server is not None:
            server.stop()


def run_generate(args) -> int:
    config, gen = from_args(EngineConfig, args), from_args(GenerationConfig, args)
    with early_server(config) as server:
        from teegpu.tee.engine import Engine

        on_text = None if args.json else (lambda t: (sys.stdout.write(t), sys.stdout.flush()))
        with Engine.open(config, warm_up=True, server=server) as engine:
            result = engine.generate(args.prompt, gen, chat=args.chat, on_text=on_text,
                                     speculative=from_args(SpeculativeConfig, args))
            if not args.json:
                print(flush=True)  # end the streamed line before the server's exit message
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print_summary(result)
    return 0


def print_summary(result) -> None:
    t, r = result.timings, result.rpc
    print(f"[{len(result.token_ids)} tokens, {result.finish_reason}; prefill {t['prefill_ms']:.0f} ms, "
          f"decode {t['decode_ms_per_token'] or 0:.1f} ms/token; {r.get('calls', 0)} RPCs]", file=sys.stderr)
    if r.get("breakdown_ms"):
        b = r["breakdown_ms"]
        parts = ", ".join(f"{k.removesuffix('_ms')} {v:.0f}" for k, v in b.items() if k != "total_ms")
        print(f"[RPC time {b['total_ms']:.0f} ms: {parts}; {(r['bytes_sent'] + r['bytes_received']) / 1e6:.1f} MB]",
              file=sys.stderr)


def run_api(args) -> int:
    config = from_args(EngineConfig, args)
    with early_server(config) as server:
        from teegpu.api.app import run_api as run

        run(from_args(ApiConfig, args), config, from_args(SchedulerConfig, args),
            speculative=from_args(SpeculativeConfig, args), server=server)
    return 0


def run_shaped_model(args) -> int:
    from teegpu.model.shaped import write_shaped_model

    print(f"wrote {write_shaped_model(from_args(ShapedModelConfig, args))}")
    return 0


def run_verify(args) -> int:
    from teegpu.client import verify_server

    done = verify_server(args.url, from_args(VerifyConfig, args))
    if args.json:
        print(json.dumps({**done.__dict__, "spki_sha256": done.spki_sha256.hex()}))
        return 0
    print_checks(done)
    return 0


def print_checks(done) -> None:
    print(f"{done.url}: attestation {done.attestation}, {done.measurement or 'no measurement'}")
    for line in done.checks:
        print(f"  ok  {line}")


def run_proxy(args) -> int:
    from teegpu.proxy import run_proxy as run

    run(from_args(ProxyConfig, args), from_args(VerifyConfig, args), report=print_checks)
    return 0


def run_keys(args) -> int:
    from teegpu.transport import generate_keys

    public, secret = generate_keys(args.directory, args.name)
    print(f"wrote {public} (public: give it to the peer) and {secret} (secret: keep it, mode 0600)")
    return 0


COMMANDS = {"serve": run_serve, "generate": run_generate, "api": run_api, "analyze": run_analyze,
            "keys": run_keys, "shaped-model": run_shaped_model,
            "verify": run_verify, "proxy": run_proxy}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve" or (args.command in ("generate", "api") and not args.local):
        let_idle_workers_sleep()  # before torch loads: the two sides take turns on the cores
    debug = args.debug or os.environ.get("TEEGPU_DEBUG") == "1"
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return 130
    except TeegpuError as e:
        if debug:
            raise
        print(f"teegpu: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # anything else is a bug, but still one line unless asked for more
        if debug:
            raise
        print(f"teegpu: internal error: {type(e).__name__}: {e} (run with --debug for the traceback)",
              file=sys.stderr)
        return 1


def run() -> None:
    """The `teegpu` command. Before exiting, every object left is frozen out of the garbage
    collector: the interpreter's exit otherwise walks all of them (torch's included) in several
    collections, 0.5 s of every process's exit on an AMD EPYC family 25; the OS frees them anyway."""
    try:
        sys.exit(main())
    finally:  # also when main ends by SystemExit (`teegpu api` on SIGTERM)
        gc.freeze()


if __name__ == "__main__":
    run()
