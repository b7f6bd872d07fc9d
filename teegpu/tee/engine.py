"""The trusted engine: tokenizer, embeddings, norms, rotary, attention with the KV cache,
sampling. Only activations cross to the server, through the `linears` seam."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from teegpu.config import EngineConfig, GenerationConfig, SchedulerConfig, SpeculativeConfig
from teegpu.errors import ConfigError, ContextLengthError
from teegpu.model.llama import KVCache, Linears, RopeTables, Segment, TrustedWeights, forward, rope_tables
from teegpu.model.products import kernels, poll_slowdown
from teegpu.model.loading import load_weights, resolve_model_path, verify_model_sha256
from teegpu.model.tokenizer import ChatTokenizer, load_tokenizer
from teegpu.model.weights import ModelWeights
from teegpu.options import DEFAULT_MASK_POOL_ROWS, DEFAULT_TIMEOUT_MS, idle_workers_sleep, under_gramine
from teegpu.protocol import WIRE_DTYPES, Hello, Op
from teegpu.server_process import ServerProcess, private_server
from teegpu.tee.accounting import GenerationClock
from teegpu.tee.gramine import check_endpoint_reachable
from teegpu.tee.linears import LocalLinears, handshake, open_linears
from teegpu.tee.prefix_cache import PrefixCache
from teegpu.tee.text_stream import TextStream
from teegpu.transport import ClientCurve, RpcClient
from teegpu.transport.endpoint import parse_endpoint, same_host_reason
from teegpu.transport.shm_region import DEFAULT_BYTES as DEFAULT_SHM_BYTES

PING_TIMEOUT_MS = 2_000  # a health probe's deadline, shorter than a product's
THREADED_ROWS = 32  # with a server, steps of fewer rows (decode) run on one thread (trusted_threads)

__all__ = ["Engine", "EngineConfig", "GenerationConfig", "GenerationResult"]


@dataclass(slots=True)
class GenerationResult:
    text: str
    token_ids: list[int]  # generated ids only
    prompt_tokens: int
    finish_reason: str  # "stop" (end of sequence or a stop string) or "length"
    timings: dict = field(default_factory=dict)  # load_s, prefill_ms, decode_ms_per_token
    rpc: dict = field(default_factory=dict)  # calls, bytes_sent, bytes_received
    logprobs: list = field(default_factory=list)  # with GenerationConfig.logprobs: one entry per token
    prompt_logprobs: list = field(default_factory=list)  # with GenerationConfig.prompt_logprobs: per prompt token
    speculation: dict = field(default_factory=dict)  # with speculative decoding: drafted, accepted, tokens per step
    kernels: dict = field(default_factory=dict)  # {"trusted": products.Kernels, "server": the server's}

    def to_dict(self) -> dict:
        return asdict(self)


class Engine:
    """Runs generation on the trusted side; see `Engine.open` for the usual way in."""

    def __init__(self, weights: ModelWeights, tokenizer: ChatTokenizer, linears: Linears, *,
                 dtype: torch.dtype = torch.float32, offload_attention: bool = False, stop_ids: set[int] | None = None,
                 client: RpcClient | None = None, server_process: ServerProcess | None = None):
        self.config = weights.config
        self.dtype = dtype
        self.weights = weights
        self.tokenizer = tokenizer
        self.linears = linears
        self.telemetry = linears.telemetry
        self._prefix_cache: PrefixCache | None = None
        self.offload_attention = offload_attention
        self.client = client
        self.server_process = server_process
        self.hello: Hello | None = None
        eos = tokenizer.eos_token_id
        self.stop_ids = set(stop_ids or ()) | ({eos} if eos is not None else set())
        self.load_s = 0.0
        self.threads: int | None = None  # torch threads of steps of THREADED_ROWS rows or more (set by open;
        # smaller steps then take one); None: torch's setting is left alone
        self.trusted = trusted_weights(weights, dtype)
        self.rope_freq_factors = weights.read("rope_freq_factors") if weights.has("rope_freq_factors") else None
        self.rope = RopeTables(torch.empty(0), torch.empty(0))  # grown by new_cache as positions are needed
        self._token_text: dict[int, str] = {}

    @classmethod
    def open(cls, config: EngineConfig, warm_up: bool = False, server: ServerProcess | None = None) -> "Engine":
        """Load the model on the trusted side and connect to (or start) the GPU server; with
        `warm_up`, end with `Engine.warm_up` (counted in load_s, not in the first prompt).
        `server`: the private server `private_server(config)` started already (the engine owns it)."""
        start = time.monotonic()
        if config.server is None and not config.local and under_gramine():
            raise ConfigError("inside Gramine the GPU server runs on the host: start `teegpu serve` there and "
                              "pass --server tcp://HOST:PORT")
        if config.model_sha256 is not None:
            verify_model_sha256(config.model, config.model_sha256)
        proc = server or private_server(config)  # first: it loads while we do
        engine = None
        try:
            weights, tokenizer = load_weights(config.model), load_tokenizer(config.model)
            engine = cls._open_loaded(config, weights, tokenizer, proc)
            if warm_up:
                engine.warm_up()
            if config.rpc_log:
                engine.telemetry.open(config.rpc_log, run_info(config, engine.hello, engine.client))
        except BaseException:
            if engine is not None:
                engine.close()
            elif proc is not None:
                proc.stop()
            raise
        engine.load_s = time.monotonic() - start
        return engine

    @classmethod
    def _open_loaded(cls, config: EngineConfig, weights: ModelWeights, tokenizer, proc) -> "Engine":
        stop_ids = generation_eos_ids(config.model)
        if config.local:
            if config.threads is not None:
                torch.set_num_threads(config.threads)
            dtype = WIRE_DTYPES[config.dtype]
            if config.privacy == "otp":  # the integer products in float32 activations, as the split runs them
                dtype = torch.float32
            engine = cls(weights, tokenizer, LocalLinears(weights, dtype, config.privacy), dtype=dtype,
                         offload_attention=config.offload_attention, stop_ids=stop_ids)
            # decode steps on one thread, as the split's trusted side runs them (products still take
            # product_threads): OpenMP workers left spinning here take a busy host's other core
            engine.threads = torch.get_num_threads()
            return engine
        curve = ClientCurve(config.curve_secret, config.curve_server_key) if config.curve_secret else None
        engine = cls.connect(weights, tokenizer, config.server or proc.wait_ready(), config.timeout_ms,
                             data_plane=config.data_plane, control_plane=config.control_plane,
                             privacy=config.privacy, verify=config.verify,
                             mask_pool_rows=config.mask_pool_rows, curve=curve,
                             pad_server=config.pad_server, pads=config.pads,
                             pad_curve=ClientCurve(config.curve_secret, config.pad_curve_server_key)
                             if config.pad_curve_server_key else None,
                             offload_attention=config.offload_attention, stop_ids=stop_ids)
        engine.server_process = proc
        engine.threads = config.threads or trusted_threads()
        return engine

    @classmethod
    def connect(cls, weights: ModelWeights, tokenizer, endpoint: str, timeout_ms: int = DEFAULT_TIMEOUT_MS,
                data_plane: str = "socket", privacy: str = "plain", verify: bool = False,
                mask_pool_rows: int = DEFAULT_MASK_POOL_ROWS, curve: ClientCurve | None = None,
                control_plane: str = "doorbell", pad_server: tuple[str, ...] = (), pads: str = "local",
                pad_curve: ClientCurve | None = None, shm_bytes: int = DEFAULT_SHM_BYTES, **kw) -> "Engine":
        """An engine on already loaded weights, using the server at `endpoint` after a handshake (and
        in otp mode the pad servers `pad_server`, if any: EngineConfig says what `pads` means);
        `shm_bytes`: the size of the shared region on the shm data plane."""
        check_endpoint_reachable(endpoint)
        client = RpcClient(endpoint, timeout_ms, data_plane=data_plane, curve=curve, control_plane=control_plane,
                           shm_bytes=shm_bytes, poll_slowdown=poll_slowdown())
        pad_client = None
        try:
            if pad_server:
                pad_client = open_pad_client(list(pad_server), timeout_ms, data_plane, pad_curve)
            hello = handshake(client, weights, privacy)
            linears = open_linears(client, weights, hello, privacy, verify, mask_pool_rows, pad_client, pads)
        except BaseException:
            client.close()
            if pad_client is not None:
                pad_client.close()
            raise
        dtype = torch.float32 if privacy == "otp" else WIRE_DTYPES[hello.dtype]
        engine = cls(weights, tokenizer, linears, dtype=dtype, client=client, **kw)
        engine.hello = hello
        return engine

    def close(self) -> None:
        self.linears.close()
        if self.client is not None:
            self.client.close()
        if self.server_process is not None:
            self.server_process.stop()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def ping(self, timeout_ms: int = PING_TIMEOUT_MS) -> bool:
        """Whether the server answers a HELLO soon (always true without one)."""
        if self.client is None:
            return True
        try:
            self.client.call(Op.HELLO, 0, timeout_ms=min(timeout_ms, self.client.timeout_ms))
            return True
        except Exception:
            return False

    # -- the forward pass --

    def warm_up(self) -> None:
        """A two-token prefill and a decode step on a scratch cache, so that one-time set-up (the
        kernels' code generation, the shared region's request plans, the polling windows) is paid
        while loading, not by the first prompt."""
        cache = self.new_cache(3)
        self.forward([0, 0], 0, cache)
        self.forward([0], 2, cache)

    def prefix_cache(self, block_tokens: int) -> PrefixCache:
        """This engine's prefix cache, shared by its schedulers (a new block size starts a new one)."""
        if self._prefix_cache is None or self._prefix_cache.block_tokens != block_tokens:
            self._prefix_cache = PrefixCache(block_tokens)
        return self._prefix_cache

    def cache_bytes(self, positions: int) -> int:
        return KVCache.nbytes_for(self.config, positions, self.dtype)

    def new_cache(self, positions: int) -> KVCache:
        if positions > self.config.max_position_embeddings:
            raise ContextLengthError(
                f"{positions} positions exceed the context window of {self.config.max_position_embeddings}")
        if self.rope.cos.shape[0] < positions:  # tables for the longest cache so far
            tables = rope_tables(self.config, positions, self.rope_freq_factors)
            self.rope = RopeTables(tables.cos.to(self.dtype), tables.sin.to(self.dtype))
        return KVCache(self.config, positions, self.dtype)

    def check_ids(self, ids) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long)
        if ids.dim() != 1 or ids.numel() == 0:
            raise ConfigError("forward takes a non-empty 1-D sequence of token ids")
        if int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size:
            raise ConfigError(f"token ids must lie in [0, {self.config.vocab_size})")
        return ids

    @torch.inference_mode()
    def forward(self, ids: list[int] | torch.Tensor, start: int, cache: KVCache,
                all_logits: bool = False) -> torch.Tensor:
        """Logits of one sequence's ids at positions start.. (the last row's, or every row's)."""
        ids = self.check_ids(ids)
        if start + ids.numel() > cache.max_positions:
            raise ContextLengthError(f"positions up to {start + ids.numel()} exceed the cache of {cache.max_positions}")
        rows = None if all_logits else [ids.numel() - 1]
        return self.forward_packed(ids, [Segment(cache, start, ids.numel())], rows)

    @torch.inference_mode()
    def forward_packed(self, ids, segments: list[Segment], logit_rows: list[int] | None) -> torch.Tensor:
        """Logits for the packed rows of several sequences (the scheduler's step), as float32."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        if self.telemetry is not None:
            self.telemetry.flush()  # one flush per forward pass keeps `tail -f` current, and cheap
        if self.threads is not None:
            torch.set_num_threads(self.threads if ids.numel() >= THREADED_ROWS else 1)
        return forward(ids, segments, self.config, self.trusted, self.rope, self.linears, logit_rows,
                       self.offload_attention).float()

    # -- text --

    def encode(self, prompt: str | list, chat: bool = False) -> list[int]:
        """Token ids of a prompt: a string, chat messages, or ids already."""
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            ids = list(prompt)
        elif chat or isinstance(prompt, list):
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            ids = self.tokenizer.encode_chat(messages)
        else:
            ids = self.tokenizer.encode(prompt)
        if not ids:
            raise ConfigError("the prompt is empty")
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def text_stream(self, stop: tuple[str, ...] = ()) -> TextStream:
        return TextStream(self.decode, stop)

    def token_text(self, token: int) -> str:
        """One token's text (memoised: logprobs ask for the same ones again and again)."""
        if token not in self._token_text:
            self._token_text[token] = self.tokenizer.decode([token])
        return self._token_text[token]

    def generate(self, prompt: str | list, gen: GenerationConfig | None = None, *, chat: bool = False,
                 on_text: Callable[[str], None] | None = None,
                 speculative: SpeculativeConfig | None = None) -> GenerationResult:
        """Prefill the prompt, then decode until EOS, a stop string or max_new_tokens; stream text to
        on_text. One sequence through the same scheduler that batches many (`teegpu api`)."""
        from teegpu.tee.scheduler import Scheduler

        gen = gen or GenerationConfig()
        ids = self.encode(prompt, chat)
        positions = len(ids) + gen.max_new_tokens
        budget_mb = max(1, math.ceil(self.cache_bytes(positions) / (1 << 20)))
        scheduler = Scheduler(self, SchedulerConfig(max_batch=1, max_queue=0, kv_cache_mb=budget_mb,
                                                    prefill_chunk=len(ids)), speculative)
        clock = GenerationClock(self)
        seq = scheduler.submit(ids, gen, on_event=(lambda e: e.text and on_text(e.text)) if on_text else None)
        while not seq.done.is_set():
            clock.phase(seq)
            scheduler.step()
        if seq.error is not None:
            raise seq.error
        timings, rpc = clock.report(seq, self.load_s)
        return GenerationResult(seq.text, seq.out, len(ids), seq.finish_reason, timings, rpc, seq.logprobs,
                                seq.prompt_logprobs, scheduler.speculation.as_dict() if scheduler.speculative else {},
                                self.kernels())

    def kernels(self) -> dict:
        """Which kernels compute: this process's, and the server's as its HELLO said."""
        report = {"trusted": kernels().as_dict()}
        if self.hello is not None:
            report["server"] = self.hello.kernels
        return report

    def rpc_summary(self) -> dict:
        """Calls, bytes and the time breakdown of every RPC so far (empty without a server)."""
        return self.linears.stats()


def open_pad_client(endpoints: list[str], timeout_ms: int, data_plane: str, curve: ClientCurve | None) -> RpcClient:
    """The client of a pad server pool. It is served by its own thread, which sleeps on the socket
    while it waits (no doorbell polling: that would spend the trusted side's cores). Without CURVE
    the pad key crosses the network in clear: said here (docs/security.md)."""
    for endpoint in endpoints:
        check_endpoint_reachable(endpoint)
        if curve is None and same_host_reason(parse_endpoint(endpoint)) is not None:
            print(f"teegpu: warning: the pad key goes to {endpoint} without CURVE: whoever reads that connection "
                  "can remove the pads (docs/security.md)", file=sys.stderr, flush=True)
    return RpcClient(endpoints, timeout_ms, data_plane=data_plane, curve=curve, control_plane="socket")


def run_info(config: EngineConfig, hello: Hello, client: RpcClient) -> dict:
    """The first record of an RPC log: what ran, where, with which versions."""
    import zmq

    from teegpu import __version__

    return {"model": str(resolve_model_path(config.model)), "fingerprint": hello.fingerprint,
            "transport": client.endpoint.transport, "endpoint": client.endpoint.url,
            "dtype": hello.dtype, "device": hello.device, "privacy": config.privacy,
            "verify": config.verify, "data_plane": client.data_plane, "doorbell": client.doorbell,
            "offload_attention": config.offload_attention, "num_layers": hello.config["num_layers"],
            "versions": {"teegpu": __version__, "torch": torch.__version__, "pyzmq": zmq.__version__,
                         "libzmq": zmq.zmq_version()}}


def generation_eos_ids(model: str | None) -> set[int]:
    """Extra end-of-sequence ids from a HF directory's generation_config.json."""
    path = resolve_model_path(model)
    gen_file = path / "generation_config.json" if path.is_dir() else None
    if gen_file is None or not gen_file.is_file():
        return set()
    eos = json.loads(gen_file.read_text()).get("eos_token_id")
    return set(eos if isinstance(eos, list) else [eos] if eos is not None else [])


def trusted_weights(weights: ModelWeights, dtype: torch.dtype) -> TrustedWeights:
    """What the trusted side keeps of the model: embeddings and norms, in its activation dtype,
    except that the embeddings stay in the file's dtype when every value converts exactly (a bf16
    file under fp32 activations: half the bytes, the same rows). No linear weight: the server
    holds those (the LM head too, tied or not)."""
    layers = range(weights.config.num_layers)
    stored = weights.tensors["embed"][0].dtype
    embed_dtype = stored if torch.promote_types(stored, dtype) == dtype else dtype
    return TrustedWeights(weights.read("embed", embed_dtype),
                          [weights.read(f"layers.{i}.attn_norm", dtype) for i in layers],
                          [weights.read(f"layers.{i}.ffn_norm", dtype) for i in layers],
                          weights.read("final_norm", dtype))


def trusted_threads() -> int:
    """Torch threads of the trusted side's long steps (prefill) with a server, unless configured:
    every core when idle OpenMP workers sleep (each side computes while the other waits), else
    one, so that no worker of ours spins on a core the server's products need. Short steps
    (decode) always take one: waking a worker costs more than it saves (BENCHMARKS.md).
    OMP_NUM_THREADS, where set, caps it (the Gramine manifest sets it)."""
    if not idle_workers_sleep():
        return 1
    cap = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(cap) if cap.isdigit() and int(cap) > 0 else os.cpu_count() or 1
