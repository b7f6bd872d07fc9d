"""Every run configuration as a dataclass: the one place an option is named, defaulted,
documented and validated. The CLI's flags are generated from these fields (`add_arguments`),
and a child process gets its options back from `to_argv`, so nothing is written twice.

This module holds no secrets and imports neither side: the server and the trusted engine
both read their configuration from here.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field

from teegpu.errors import ConfigError
from teegpu.options import (
    ATTESTATION_KINDS, CONTROL_PLANES, DATA_PLANES, DEFAULT_MASK_POOL_ROWS, DEFAULT_SPIN_MAX_US, DEFAULT_TIMEOUT_MS,
    DEVICES, DTYPES, PAD_MODES, PRIVACY_MODES, TP_FAN_OUTS,
)


def option(default, help: str, **argparse_kw):
    """A config field with its CLI help (and choices/metavar) in the field's metadata."""
    return field(default=default, metadata={"help": help, **argparse_kw})


def _check_choices(config) -> None:
    """Every field declared with choices (in its option metadata) holds one of them."""
    for f in dataclasses.fields(config):
        choices, value = f.metadata.get("choices"), getattr(config, f.name)
        if choices is not None and value not in choices:
            raise ConfigError(f"{f.name.replace('_', ' ')} {value!r}: choose one of {tuple(choices)}")


def token_bias(text: str) -> tuple[int, float]:
    """`--logit-bias ID=BIAS` as (token id, bias)."""
    token, sep, bias = text.partition("=")
    try:
        return int(token), float(bias)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ID=BIAS (e.g. 2=-100), got {text!r}") from None


def _check_min(name: str, value, low) -> None:
    if value is not None and value < low:
        raise ConfigError(f"{name} must be at least {low}, got {value}")


@dataclass(slots=True)
class ServerConfig:
    """The untrusted GPU server (`teegpu serve`)."""

    model: str | None = option(None, "GGUF file or HF directory (default: SmolLM2-135M-Instruct)")
    endpoint: str = option("tcp://127.0.0.1:5555", "tcp://HOST:PORT (port * picks a free one) or ipc:///PATH")
    device: str = option("auto", "where the products run", choices=DEVICES)
    dtype: str = option("float32", "weights and wire dtype", choices=DTYPES)
    data_plane: str = option("shm", "shm: clients on this host may pass tensors through /dev/shm; socket: refuse",
                             choices=DATA_PLANES)
    control_plane: str = option("doorbell", "doorbell: shm clients may announce requests in their region's "
                                "doorbell; socket: only by message", choices=CONTROL_PLANES)
    spin_max_us: int = option(DEFAULT_SPIN_MAX_US, "longest the server polls doorbells after a request before it "
                              "sleeps on its socket (adapted to the traffic below that)")
    # Pays where the server host has idle cores (a GPU server): the next request of a decode
    # step follows within tens of microseconds. On a 2-core host it steals the client's core.
    busy_poll_us: int = option(0, "after each reply, poll the socket this long without sleeping (hosts with "
                               "idle cores; socket control plane)")
    privacy: str = option("plain", "otp: integer weights, accept only one-time-padded int64 activations",
                          choices=PRIVACY_MODES)
    curve_secret: str | None = option(None, "CURVE: this server's NAME.key_secret (needs --curve-allow)",
                                      metavar="KEY_SECRET")
    curve_allow: str | None = option(None, "CURVE: directory of the client public keys to accept", metavar="DIR")
    parent_pid: int | None = option(None, "stop once the process with this id is gone (a private server's "
                                    "trusted side)", metavar="PID")
    tensor_parallel: int = option(1, "split every linear by output columns across N ranks (torch.distributed); "
                                  "under torchrun N is its world size, else this command starts N-1 local ranks",
                                  metavar="N")
    tp_fan_out: str = option("auto", "how rank 0 hands a request's input to the other ranks: shm (one host), "
                             "broadcast (torch.distributed), auto (shm when every rank is on this host)",
                             choices=TP_FAN_OUTS)
    tp_timeout_s: float = option(60.0, "a collective that waits longer than this takes the tensor-parallel group "
                                 "down (longer than the slowest product)", metavar="S")

    def __post_init__(self):
        if (self.curve_secret is None) != (self.curve_allow is None):
            raise ConfigError("CURVE needs both the server's secret key and the client allow list")
        _check_choices(self)
        _check_min("busy_poll_us", self.busy_poll_us, 0)
        _check_min("spin_max_us", self.spin_max_us, 0)
        _check_min("tensor_parallel", self.tensor_parallel, 1)
        if self.tp_timeout_s <= 0:
            raise ConfigError(f"tp_timeout_s must be positive, got {self.tp_timeout_s}")

    def to_argv(self) -> list[str]:
        return to_argv(self)


@dataclass(slots=True)
class EngineConfig:
    """The trusted engine: which model, which server, how products are protected."""

    model: str | None = option(None, "GGUF file or HF directory (default: SmolLM2-135M-Instruct)")
    server: str | None = option(None, "endpoint of a running server, or several, comma-separated: a pool used "
                                "one at a time, failing over (default: start a private one)")
    local: bool = option(False, "TEE-only baseline: no server, compute everything here (with --privacy otp: "
                         "the same integer products, unpadded: what the split otp run equals bit for bit)")
    # dtype of the products, on the wire and of the trusted side's activations (as transformers
    # runs a model in that dtype); with `server`, the server's dtype decides
    dtype: str = option("float32", "dtype of the started server and of the trusted activations", choices=DTYPES)
    device: str = option("auto", "device of the started server", choices=DEVICES)
    data_plane: str = option("shm", "shm: tensors through /dev/shm when the server is on this host; "
                             "socket: in the messages", choices=DATA_PLANES)
    control_plane: str = option("doorbell", "with shm, announce requests in the region's doorbell (polled, no "
                                "wake-ups) or by message", choices=CONTROL_PLANES)
    timeout_ms: int = option(DEFAULT_TIMEOUT_MS, "deadline of each request to the server")
    offload_attention: bool = option(False, "plaintext Q*K^T and P*V on the server (the seed's schedule)")
    rpc_log: str | None = option(None, "write one JSON Lines record per RPC (teegpu analyze reads it)",
                                 metavar="PATH")
    privacy: str = option("plain", "otp: the server sees only one-time-padded integers (docs/security.md)",
                          choices=PRIVACY_MODES)
    verify: bool = option(False, "Freivalds' check on every product the server returns")
    mask_pool_rows: int = option(DEFAULT_MASK_POOL_ROWS, "otp: pads precomputed per weight")
    # None with a server: every core when idle OpenMP workers sleep (the two sides take turns),
    # else 1 (spinning workers here would steal the cores the server's products need;
    # BENCHMARKS.md); torch's default when local.
    threads: int | None = option(None, "torch threads of the trusted side (default with a server: all cores "
                                 "when OMP_WAIT_POLICY=PASSIVE, which the teegpu command sets, else 1)")
    model_sha256: str | None = option(None, "refuse a model file with another SHA-256", metavar="HEX")
    curve_secret: str | None = option(None, "CURVE to --server: this client's NAME.key_secret", metavar="KEY_SECRET")
    curve_server_key: str | None = option(None, "CURVE: the pinned server's public NAME.key", metavar="KEY")
    pad_server: tuple[str, ...] = option((), "otp: a pad server, a `teegpu serve --privacy otp` run by another "
                                         "operator than --server's, that computes the pads' products (repeat, "
                                         "or comma-separate, for a pool)", metavar="ENDPOINT")
    pads: str | None = option(None, "otp: who computes the pads' products: server (the pad servers; fail when "
                              "all are down), local (this process), server-or-local (compute here while every "
                              "pad server is down, said in stats, /metrics and the log); default: "
                              "server-or-local with --pad-server, else local", choices=(None, *PAD_MODES),
                              metavar="MODE")
    pad_curve_server_key: str | None = option(None, "CURVE to --pad-server: the pinned pad server's public "
                                              "NAME.key (this client's key: --curve-secret)", metavar="KEY")

    def __post_init__(self):
        _check_min("timeout_ms", self.timeout_ms, 1)
        self.pad_server = tuple(e.strip() for item in self.pad_server for e in item.split(",") if e.strip())
        if self.pads is None:
            self.pads = "server-or-local" if self.pad_server else "local"
        self._check_pads()
        _check_choices(self)
        _check_min("mask_pool_rows", self.mask_pool_rows, 1)
        _check_min("threads", self.threads, 1)
        if self.privacy == "otp" and self.offload_attention:
            raise ConfigError("--offload-attention sends Q*K^T and P*V in clear: it cannot be combined with "
                              "--privacy otp")
        if (self.curve_secret is None) != (self.curve_server_key is None):
            raise ConfigError("CURVE needs both this client's secret key and the server's public key")
        if self.curve_secret is not None and self.server is None:
            raise ConfigError("CURVE keys secure a connection to --server; a private server needs none")
        if self.local and self.server:
            raise ConfigError("local (TEE-only) mode uses no server; drop server or local")

    def _check_pads(self) -> None:
        if self.pad_server and self.privacy != "otp":
            raise ConfigError("a pad server makes the pads of --privacy otp; add --privacy otp or drop --pad-server")
        if self.pad_server and self.local:
            raise ConfigError("local (TEE-only) mode uses no pads; drop pad server or local")
        if self.pads != "local" and not self.pad_server:
            raise ConfigError(f"pads {self.pads!r} need a pad server (--pad-server ENDPOINT)")
        if self.pads == "local" and self.pad_server:
            raise ConfigError("pads 'local' computes every pad here: drop --pad-server, or choose --pads server")
        if self.pad_curve_server_key is not None and (self.curve_secret is None or not self.pad_server):
            raise ConfigError("--pad-curve-server-key needs --pad-server and this client's --curve-secret")
        if self.curve_secret is not None and self.pad_server and self.pad_curve_server_key is None:
            raise ConfigError("CURVE is on: give the pad server's public key too (--pad-curve-server-key), so that "
                              "the pad key never travels in clear")


@dataclass(slots=True)
class GenerationConfig:
    """One sequence's sampling and stopping; every sequence of a batch has its own."""

    max_new_tokens: int = option(64, "most tokens to generate (0: only read the prompt, e.g. for its logprobs)")
    temperature: float = option(0.0, "0: greedy")
    top_p: float = option(1.0, "nucleus sampling: keep the smallest set of tokens with this much probability")
    top_k: int = option(0, "keep the k most likely tokens (0: all)")
    seed: int | None = option(None, "seed of this sequence's sampler (default: fresh randomness)")
    stop_at_eos: bool = option(True, "stop at the model's end-of-sequence token")
    stop: tuple[str, ...] = option((), "stop before this text (repeat for several, up to 4)", metavar="TEXT")
    logprobs: int | None = option(None, "return the log-probability of each token and this many alternatives "
                                  "(0..20)", metavar="N")
    presence_penalty: float = option(0.0, "subtract this from the logit of every token already generated (-2..2)")
    frequency_penalty: float = option(0.0, "subtract this times its count so far from each generated token's logit "
                                      "(-2..2)")
    logit_bias: tuple[tuple[int, float], ...] = option((), "add BIAS (-100..100) to token ID's logit before sampling "
                                                       "(repeat for several)", type=token_bias, metavar="ID=BIAS")
    prompt_logprobs: bool = option(False, "also give the log-probability of each prompt token after the first "
                                   "(with --logprobs)")

    def __post_init__(self):
        _check_min("max_new_tokens", self.max_new_tokens, 0)
        if not self.temperature >= 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        _check_min("top_k", self.top_k, 0)
        if self.seed is not None and not -(1 << 63) <= self.seed < (1 << 64):
            raise ConfigError(f"seed must fit in 64 bits, got {self.seed}")
        self.stop = tuple(self.stop)
        if len(self.stop) > 4 or not all(isinstance(s, str) and s for s in self.stop):
            raise ConfigError("stop takes up to 4 non-empty strings")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ConfigError(f"logprobs must be in 0..20, got {self.logprobs}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ConfigError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        self.logit_bias = tuple((int(t), float(b)) for t, b in self.logit_bias)
        for token, bias in self.logit_bias:
            if not -100 <= bias <= 100:
                raise ConfigError(f"logit_bias of token {token} must be in [-100, 100], got {bias}")
        if self.prompt_logprobs and self.logprobs is None:
            raise ConfigError("prompt_logprobs needs logprobs")


@dataclass(slots=True)
class SchedulerConfig:
    """Continuous batching on the trusted side: how many sequences share a step, and their memory."""

    max_batch: int = option(8, "most sequences decoding at once")
    max_queue: int = option(64, "most requests waiting for a place; past it, new ones are refused (HTTP 429)")
    kv_cache_mb: int = option(2048, "memory budget of all KV caches together; a request waits until its "
                              "cache fits")
    prefill_chunk: int = option(256, "most prompt tokens one step prefills, over all sequences")
    prefix_cache: bool = option(True, "keep the KV cache of prompt blocks (in the KV budget, least recently used "
                                "evicted first) so that a request starting the same way prefills only the rest")
    prefix_block_tokens: int = option(32, "positions per prefix cache block: a prefix is reused in whole blocks")

    def __post_init__(self):
        for name in ("max_batch", "kv_cache_mb", "prefill_chunk", "prefix_block_tokens"):
            _check_min(name, getattr(self, name), 1)
        _check_min("max_queue", self.max_queue, 0)


@dataclass(slots=True)
class SpeculativeConfig:
    """Speculative decoding: drafted tokens checked in the same step as a sequence's last one."""

    speculative: str = option("none", "draft tokens by prompt lookup (ngram: the continuation of the last "
                              "n-gram's earlier occurrence in the prompt or the output) and check them in one "
                              "step", choices=("none", "ngram"))
    num_speculative_tokens: int = option(4, "most tokens drafted per step (fewer while they are rejected)")
    ngram_min: int = option(2, "shortest n-gram matched")
    ngram_max: int = option(4, "longest n-gram matched (the longest match wins)")

    def __post_init__(self):
        _check_choices(self)
        _check_min("num_speculative_tokens", self.num_speculative_tokens, 1)
        _check_min("ngram_min", self.ngram_min, 1)
        if self.ngram_max < self.ngram_min:
            raise ConfigError(f"ngram_max ({self.ngram_max}) must be at least ngram_min ({self.ngram_min})")

    @property
    def enabled(self) -> bool:
        return self.speculative != "none"


@dataclass(slots=True)
class ApiConfig:
    """The OpenAI-compatible HTTP front end (`teegpu api`)."""

    host: str = option("127.0.0.1", "address to listen on")
    port: int = option(8000, "port to listen on (0: a free one)")
    api_key: str | None = option(None, "require 'Authorization: Bearer KEY' on every /v1 request", metavar="KEY")
    max_body_bytes: int = option(1 << 20, "largest request body accepted (HTTP 413 past it)")
    tls: bool = option(False, "HTTPS with a fresh key made in the TEE; its certificate carries a quote that "
                              "binds the key, the model and the privacy mode (docs/security.md)")
    attestation: str = option("auto", "where quotes come from: auto (detected), gramine (/dev/attestation), tdx "
                                      "(configfs-tsm) or none", choices=ATTESTATION_KINDS)

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535, got {self.port}")
        _check_min("max_body_bytes", self.max_body_bytes, 1024)
        _check_choices(self)
        if self.attestation in ("gramine", "tdx") and not self.tls:
            raise ConfigError(f"--attestation {self.attestation} needs --tls: the quote vouches for the TLS key")


@dataclass(slots=True)
class VerifyConfig:
    """What a client requires of an attested teegpu server (teegpu verify, teegpu.client)."""

    mrenclave: str | None = option(None, "SGX: the enclave measurement to require (hex)", metavar="HEX")
    mrtd: str | None = option(None, "TDX: the TD measurement to require (hex)", metavar="HEX")
    model_sha256: str | None = option(None, "the model file's SHA-256 to require", metavar="HEX")
    privacy: str | None = option(None, "the privacy mode to require (plain or otp)", choices=(None, *PRIVACY_MODES),
                                 metavar="MODE")
    pads: str | None = option(None, "otp: who must make the pads' products (server, local or server-or-local)",
                              choices=(None, *PAD_MODES), metavar="MODE")
    collateral: str | None = option(None, "DCAP collateral as dcap-qvl JSON (offline verification)", metavar="FILE")
    pccs: str | None = option(None, "fetch the collateral from this PCCS", metavar="URL")
    root_ca: str | None = option(None, "trust this root CA (DER) instead of Intel's: test deployments only",
                                 metavar="FILE")
    allow_tcb: tuple[str, ...] = option((), "a TCB status to accept besides UpToDate (repeat), e.g. "
                                            "SWHardeningNeeded", metavar="STATUS")
    insecure_no_attestation: bool = option(False, "accept a server without a quote (no TEE guarantee at all)")

    def __post_init__(self):
        _check_choices(self)
        self.allow_tcb = ("UpToDate", *(s for s in self.allow_tcb if s != "UpToDate"))
        for name in ("mrenclave", "mrtd", "model_sha256"):
            value = getattr(self, name)
            if value is not None and not all(c in "0123456789abcdefABCDEF" for c in value):
                raise ConfigError(f"{name.replace('_', '-')} {value!r} is not hex")


@dataclass(slots=True)
class ProxyConfig:
    """A local proxy that verifies a teegpu api --tls server, then forwards plain OpenAI API to it (teegpu proxy)."""

    upstream: str = option(None, "https://HOST:PORT of the teegpu api --tls to verify and forward to", metavar="URL",
                           required=True)
    listen: str = option("127.0.0.1:8080", "HOST:PORT for local apps and the chat page (port 0: a free one)",
                         metavar="HOST:PORT")
    allow_remote: bool = option(False, "allow --listen on an address other than loopback: whoever reaches it "
                                       "uses the verified upstream (and --api-key-file's key)")
    reverify_s: float = option(300.0, "verify the upstream again this often (seconds); a new key is verified at once")
    api_key_file: str | None = option(None, "send this file's API key upstream on every request, so local apps "
                                             "need none", metavar="FILE")
    timeout_s: float = option(600.0, "longest an upstream request may take (seconds)")

    def __post_init__(self):
        if not str(self.upstream or "").startswith("https://"):
            raise ConfigError(f"upstream {self.upstream!r}: give https://HOST:PORT of a teegpu api --tls")
        host, _, port = self.listen.rpartition(":")
        if not host or not port.isdigit() or int(port) > 65535:
            raise ConfigError(f"listen {self.listen!r}: give HOST:PORT, e.g. 127.0.0.1:8080")
        _check_min("reverify_s", self.reverify_s, 1)
        _check_min("timeout_s", self.timeout_s, 1)

    def listen_address(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


SHAPES = ("tiny", "llama-3.2-1b", "llama-3-8b")


@dataclass(slots=True)
class ShapedModelConfig:
    """Random-weight model of a named LLaMA shape (teegpu shaped-model)."""

    shape: str = option("tiny", "the architecture to copy", choices=SHAPES)
    out: str = option("shaped-model", "where to write it: a directory (hf) or a .gguf file (gguf)", metavar="PATH")
    format: str = option("hf", "hf: config.json + safetensors + tokenizer; gguf: one GGUF file", choices=("hf", "gguf"))
    dtype: str = option("bfloat16", "dtype the weights are stored in", choices=("float32", "bfloat16"))
    seed: int = option(0, "the same seed writes the same files")
    layers: int | None = option(None, "fewer layers than the shape has (shape tests of large models)")

    def __post_init__(self):
        _check_choices(self)
        _check_min("layers", self.layers, 1)


# ---- dataclass <-> argparse ----

def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per field of `cls`, typed from its annotation, with the help from its metadata."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint, meta = hints[f.name], dict(f.metadata)
        kw = {"dest": f.name, "help": meta.pop("help", None), **meta}
        if hint is bool:
            kw["action"] = "store_true" if f.default is False else argparse.BooleanOptionalAction
            kw["default"] = f.default
        elif typing.get_origin(hint) is tuple:
            kw.update(action="append", default=None)
            kw.setdefault("type", typing.get_args(hint)[0])
        else:
            base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
            kw.update(type=base, default=f.default)
        parser.add_argument(flag(f.name), **kw)


def from_args(cls, args: argparse.Namespace):
    """The dataclass `add_arguments` described, filled from parsed arguments."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name)
        values[f.name] = tuple(value or ()) if typing.get_origin(hints[f.name]) is tuple else value
    return cls(**values)


def to_argv(config) -> list[str]:
    """The flags that give a child process this config (fields at their default are left out)."""
    argv = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value == f.default:
            continue
        if isinstance(value, bool):
            argv.append(flag(f.name) if value else "--no-" + f.name.replace("_", "-"))
        elif isinstance(value, tuple):
            for item in value:
                argv += [flag(f.name), str(item)]
        elif value is not None:
            argv += [flag(f.name), str(value)]
    return argv
