"""The trusted engine: tokenizer, embeddings, norms, rotary, attention with the KV cache,
sampling. Only activations cross to the server, through the `linears` seam."""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from teegpu.errors import ConfigError, ContextLengthError
from teegpu.model.llama import KVCache, Linears, Norms, forward, rope_tables
from teegpu.model.loading import load_tokenizer, load_weights, resolve_model_path, verify_model_sha256
from teegpu.model.weights import ModelWeights
from teegpu.protocol import WIRE_DTYPES
from teegpu.server.linear_server import DEVICES, PRIVACY_MODES, ServerConfig
from teegpu.server_process import ServerProcess
from teegpu.tee.linears import LocalLinears, handshake, open_linears
from teegpu.tee.sampling import sample
from teegpu.tee.gramine import check_endpoint_reachable, under_gramine
from teegpu.transport import DATA_PLANES, ClientCurve, RpcClient, private_endpoint


@dataclass(slots=True)
class EngineConfig:
    model: str | None = None  # None: the default SmolLM2-135M-Instruct GGUF
    server: str | None = None  # endpoint of a running server; None starts a private one
    local: bool = False  # TEE-only baseline: compute everything here, no server
    # dtype of the products, on the wire and of the trusted side's activations (as transformers
    # runs a model in that dtype); with `server`, the server's dtype decides
    dtype: str = "float32"
    device: str = "auto"  # where a server started by the engine computes
    data_plane: str = "shm"  # tensors through /dev/shm when the server is on this host, else "socket"
    timeout_ms: int = 60_000  # deadline of each request
    offload_attention: bool = False  # plaintext Q*K^T and P*V on the server (the seed's schedule)
    rpc_log: str | None = None  # JSON Lines file: one record per RPC (see teegpu analyze)
    privacy: str = "plain"  # "otp": the server sees only one-time-padded integers (docs/security.md)
    verify: bool = False  # Freivalds' check on every product before it is used
    mask_pool_rows: int = 32  # otp: pads kept ready per weight (a prompt of more tokens stalls once)
    # torch intra-op threads of the trusted side. None: 1 with a server (its work is small, and
    # idle OpenMP workers spinning here steal the cores the server's products need; measured
    # in BENCHMARKS.md), torch's default when local.
    threads: int | None = None
    model_sha256: str | None = None  # refuse a model file with another SHA-256
    curve_secret: str | None = None  # CURVE to `server`: this client's NAME.key_secret
    curve_server_key: str | None = None  # CURVE: the pinned server's NAME.key

    def __post_init__(self):
        if self.timeout_ms <= 0:
            raise ConfigError(f"timeout_ms must be positive, got {self.timeout_ms}")
        if self.dtype not in WIRE_DTYPES:
            raise ConfigError(f"dtype {self.dtype!r}: choose one of {tuple(WIRE_DTYPES)}")
        if self.device not in DEVICES:
            raise ConfigError(f"device {self.device!r}: choose one of {DEVICES}")
        if self.data_plane not in DATA_PLANES:
            raise ConfigError(f"data plane {self.data_plane!r}: choose one of {DATA_PLANES}")
        if self.privacy not in PRIVACY_MODES:
            raise ConfigError(f"privacy {self.privacy!r}: choose one of {PRIVACY_MODES}")
        if self.privacy == "otp" and self.offload_attention:
            raise ConfigError("--offload-attention sends Q*K^T and P*V in clear: it cannot be combined with "
                              "--privacy otp")
        if self.privacy == "otp" and self.local:
            raise ConfigError("--privacy otp pads what goes to a server; local (TEE-only) mode has none")
        if self.mask_pool_rows < 1:
            raise ConfigError(f"mask_pool_rows must be at least 1, got {self.mask_pool_rows}")
        if (self.curve_secret is None) != (self.curve_server_key is None):
            raise ConfigError("CURVE needs both this client's secret key and the server's public key")
        if self.curve_secret is not None and self.server is None:
            raise ConfigError("CURVE keys secure a connection to --server; a private server needs none")
        if self.local and self.server:
            raise ConfigError("local (TEE-only) mode uses no server; drop server or local")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be at least 1, got {self.threads}")


@dataclass(slots=True)
class GenerationConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None
    stop_at_eos: bool = True

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")


@dataclass(slots=True)
class GenerationResult:
    text: str
    token_ids: list[int]  # generated ids only
    prompt_tokens: int
    finish_reason: str  # "stop" (end of sequence) or "length"
    timings: dict = field(default_factory=dict)  # load_s, prefill_ms, decode_ms_per_token
    rpc: dict = field(default_factory=dict)  # calls, bytes_sent, bytes_received

    def to_dict(self) -> dict:
        return asdict(self)


class Engine:
    """Runs generation on the trusted side; see `Engine.open` for the usual way in."""

    def __init__(self, weights: ModelWeights, tokenizer, linears: Linears, *, dtype: torch.dtype = torch.float32,
                 offload_attention: bool = False, stop_ids: set[int] | None = None,
                 client: RpcClient | None = None, server_process: ServerProcess | None = None):
        self.config = weights.config
        self.dtype = dtype
        self.weights = weights
        self.tokenizer = tokenizer
        self.linears = linears
        self.offload_attention = offload_attention
        self.client = client
        self.server_process = server_process
        self.server_info: dict = {}
        eos = getattr(tokenizer, "eos_token_id", None)
        self.stop_ids = set(stop_ids or ()) | ({eos} if eos is not None else set())
        self.load_s = 0.0
        self.telemetry = getattr(linears, "telemetry", None)
        self.norms = Norms(weights.embed.to(dtype), [l.attn_norm.to(dtype) for l in weights.layers],
                           [l.ffn_norm.to(dtype) for l in weights.layers], weights.final_norm.to(dtype),
                           torch.empty(0), torch.empty(0))

    @classmethod
    def open(cls, config: EngineConfig) -> "Engine":
        """Load the model on the trusted side and connect to (or start) the GPU server."""
        start = time.monotonic()
        if config.server is None and not config.local and under_gramine():
            raise ConfigError("inside Gramine the GPU server runs on the host: start `teegpu serve` there and "
                              "pass --server tcp://HOST:PORT")
        if config.model_sha256 is not None:
            verify_model_sha256(config.model, config.model_sha256)
        if config.threads is not None or not config.local:
            torch.set_num_threads(config.threads or 1)
        proc = None
        if not config.local and config.server is None:  # start it first: it loads while we do
            proc = ServerProcess(ServerConfig(model=config.model, endpoint=private_endpoint(),
                                              device=config.device, dtype=config.dtype, privacy=config.privacy))
        engine = None
        try:
            weights = load_weights(config.model)
            tokenizer = load_tokenizer(config.model)
            stop_ids = generation_eos_ids(config.model)
            curve = ClientCurve(config.curve_secret, config.curve_server_key) if config.curve_secret else None
            if config.local:
                dtype = WIRE_DTYPES[config.dtype]
                engine = cls(weights, tokenizer, LocalLinears(weights, dtype), dtype=dtype,
                             offload_attention=config.offload_attention, stop_ids=stop_ids)
            else:
                engine = cls.connect(weights, tokenizer, config.server or proc.wait_ready(), config.timeout_ms,
                                     data_plane=config.data_plane, privacy=config.privacy, verify=config.verify,
                                     mask_pool_rows=config.mask_pool_rows, curve=curve,
                                     offload_attention=config.offload_attention, stop_ids=stop_ids)
                engine.server_process = proc
                if config.rpc_log:
                    engine.telemetry.open(config.rpc_log, run_info(config, engine.server_info, engine.client))
        except BaseException:
            if engine is not None:
                engine.close()
            elif proc is not None:
                proc.stop()
            raise
        engine.load_s = time.monotonic() - start
        return engine

    @classmethod
    def connect(cls, weights: ModelWeights, tokenizer, endpoint: str, timeout_ms: int = 60_000,
                data_plane: str = "socket", privacy: str = "plain", verify: bool = False,
                mask_pool_rows: int = 32, curve: ClientCurve | None = None, **kw) -> "Engine":
        """An engine on already loaded weights, using the server at `endpoint` after a handshake."""
        check_endpoint_reachable(endpoint)
        client = RpcClient(endpoint, timeout_ms, data_plane=data_plane, curve=curve)
        try:
            info = handshake(client, weights, privacy)
            linears = open_linears(client, weights, info, privacy, verify, mask_pool_rows)
        except BaseException:
            client.close()
            raise
        dtype = torch.float32 if privacy == "otp" else WIRE_DTYPES[info["dtype"]]
        engine = cls(weights, tokenizer, linears, dtype=dtype, client=client, **kw)
        engine.server_info = info
        return engine

    def close(self) -> None:
        if hasattr(self.linears, "close"):
            self.linears.close()
        if self.telemetry is not None:
            self.telemetry.close()
        if self.client is not None:
            self.client.close()
        if self.server_process is not None:
            self.server_process.stop()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the forward pass --

    def new_cache(self, positions: int) -> KVCache:
        if positions > self.config.max_position_embeddings:
            raise ContextLengthError(
                f"{positions} positions exceed the context window of {self.config.max_position_embeddings}")
        if self.norms.cos.shape[0] < positions:
            cos, sin = rope_tables(self.config, positions, self.weights.rope_freq_factors)
            self.norms.cos, self.norms.sin = cos.to(self.dtype), sin.to(self.dtype)
        return KVCache(self.config, positions, self.dtype)

    @torch.inference_mode()
    def forward(self, ids: list[int] | torch.Tensor, start: int, cache: KVCache,
                all_logits: bool = False) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long)
        if ids.dim() != 1 or ids.numel() == 0:
            raise ConfigError("forward takes a non-empty 1-D sequence of token ids")
        if int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size:
            raise ConfigError(f"token ids must lie in [0, {self.config.vocab_size})")
        if start + ids.numel() > cache.max_positions:
            raise ContextLengthError(f"positions up to {start + ids.numel()} exceed the cache of {cache.max_positions}")
        return forward(ids, start, self.config, self.norms, self.linears, cache, all_logits,
                       self.offload_attention).float()

    # -- text --

    def encode(self, prompt: str | list, chat: bool = False) -> list[int]:
        """Token ids of a prompt: a string, chat messages, or ids already."""
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            ids = list(prompt)
        elif chat or isinstance(prompt, list):
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            ids = list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                          return_dict=True)["input_ids"])
        else:
            ids = list(self.tokenizer(prompt)["input_ids"])
        if not ids:
            raise ConfigError("the prompt is empty")
        return ids

    @torch.inference_mode()
    def generate(self, prompt: str | list, gen: GenerationConfig | None = None, *, chat: bool = False,
                 on_text: Callable[[str], None] | None = None) -> GenerationResult:
        """Prefill the prompt, then decode until EOS or max_new_tokens; stream text to on_text."""
        gen = gen or GenerationConfig()
        ids = self.encode(prompt, chat)
        total = len(ids) + gen.max_new_tokens
        if total > self.config.max_position_embeddings:
            raise ContextLengthError(
                f"prompt of {len(ids)} tokens + max_new_tokens {gen.max_new_tokens} = {total} exceeds the "
                f"context window of {self.config.max_position_embeddings} tokens")
        rpc_before = self.rpc_summary()
        rng = torch.Generator().manual_seed(gen.seed) if gen.seed is not None else None
        cache = self.new_cache(total)
        self._phase("prefill", 0)
        t0 = time.perf_counter()
        logits = self.forward(ids, 0, cache)
        prefill_ms = (time.perf_counter() - t0) * 1000
        out: list[int] = []
        stream = TextStream(self.tokenizer, on_text)
        finish, decode_s, steps = "length", 0.0, 0
        while True:
            token = sample(logits[-1], gen.temperature, gen.top_k, gen.top_p, rng)
            if gen.stop_at_eos and token in self.stop_ids:
                finish = "stop"
                break
            out.append(token)
            stream.push(out)
            if len(out) == gen.max_new_tokens:
                break
            self._phase("decode", len(out))
            t0 = time.perf_counter()
            logits = self.forward([token], len(ids) + len(out) - 1, cache)
            decode_s += time.perf_counter() - t0
            steps += 1
        stream.finish(out)
        self._phase("idle", len(out))
        rpc = _difference(self.rpc_summary(), rpc_before)
        timings = {"load_s": round(self.load_s, 3), "prefill_ms": round(prefill_ms, 3),
                   "decode_ms_per_token": round(decode_s * 1000 / steps, 3) if steps else None}
        if rpc.get("breakdown_ms"):  # the trusted side's own compute: forward time outside the RPCs
            timings["trusted_ms"] = round(prefill_ms + decode_s * 1000 - rpc["breakdown_ms"]["total_ms"], 3)
        pool = getattr(self.linears, "pool", None)
        if pool is not None:
            timings["offline_ms_per_token"] = round(pool.offline_ms_per_token(), 3)
        if self.telemetry is not None and rpc.get("breakdown_ms"):
            b, rows = rpc["breakdown_ms"], len(ids) + steps  # pad rows used: every position once
            self.telemetry.write_generation({"tokens": len(out), "forwards": steps + 1, "time_split_ms": {
                "offline": round(timings.get("offline_ms_per_token", 0.0) * rows, 3),
                "transfer": round(b["total_ms"] - b["server_compute_ms"], 3),
                "server_compute": b["server_compute_ms"], "trusted_compute": timings["trusted_ms"]}})
        return GenerationResult(stream.text, out, len(ids), finish, timings, rpc)


    def rpc_summary(self) -> dict:
        """The client's own call and byte counts, plus the telemetry's time breakdown."""
        if self.client is None:
            return {}
        out = self.client.stats.as_dict()
        if self.telemetry is not None:
            out["breakdown_ms"] = self.telemetry.summary()["breakdown_ms"]
        pool = getattr(self.linears, "pool", None)
        if pool is not None:
            out["mask_pool"] = {k: v for k, v in pool.stats.as_dict().items() if k != "fill_ms"}
        return out

    def _phase(self, phase: str, token: int) -> None:
        if self.telemetry is not None:
            self.telemetry.flush()  # one flush per forward pass keeps `tail -f` current, and cheap
            self.telemetry.phase, self.telemetry.token = phase, token


def _difference(after: dict, before: dict) -> dict:
    return {k: _difference(v, before[k]) if isinstance(v, dict) else round(v - before[k], 3)
            for k, v in after.items()}


def run_info(config: EngineConfig, server_info: dict, client: RpcClient) -> dict:
    """The first record of an RPC log: what ran, where, with which versions."""
    import zmq

    from teegpu import __version__

    return {"model": str(resolve_model_path(config.model)), "fingerprint": server_info["fingerprint"],
            "transport": client.endpoint.transport, "endpoint": client.endpoint.url,
            "dtype": server_info["dtype"], "device": server_info["device"], "privacy": config.privacy,
            "verify": config.verify,
            "data_plane": client.data_plane,
            "offload_attention": config.offload_attention,
            "num_layers": server_info["config"]["num_layers"],
            "versions": {"teegpu": __version__, "torch": torch.__version__, "pyzmq": zmq.__version__,
                         "libzmq": zmq.zmq_version()}}


class TextStream:
    """Turns growing token lists into text deltas, holding back split UTF-8 characters."""

    def __init__(self, tokenizer, on_text: Callable[[str], None] | None):
        self.tokenizer, self.on_text, self.text = tokenizer, on_text, ""

    def push(self, ids: list[int], final: bool = False) -> None:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd") and not final:
            return
        if self.on_text and len(text) > len(self.text) and text.startswith(self.text):
            self.on_text(text[len(self.text):])
        self.text = text

    def finish(self, ids: list[int]) -> None:
        self.push(ids, final=True)


def generation_eos_ids(model: str | None) -> set[int]:
    """Extra end-of-sequence ids from a HF directory's generation_config.json."""
    path = resolve_model_path(model)
    gen_file = path / "generation_config.json" if path.is_dir() else None
    if gen_file is None or not gen_file.is_file():
        return set()
    eos = json.loads(gen_file.read_text()).get("eos_token_id")
    return set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
