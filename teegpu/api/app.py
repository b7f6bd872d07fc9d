"""`teegpu api`: the OpenAI-compatible HTTP front end, served from the trusted process.

The prompt and the generated text exist only here (inside the TEE); the GPU server sees
activations. HTTP only: every request becomes a sequence of the scheduler, which batches
all running sequences into one step. The HTTP server starts first and answers /health 503
while the model loads; "teegpu api ready on http://HOST:PORT" is printed once /health
would answer 200. With --tls it serves HTTPS under a key made here, and its certificate
carries the TEE's quote for that key (teegpu/tee/attestation.py); the evidence is also at
/.well-known/teegpu-attestation.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import platform
import signal
import sys
import threading
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from teegpu.api.errors import ApiError, from_engine
from teegpu.api.metrics import ApiMetrics
from teegpu.api.responses import Reply, usage
from teegpu.api.schemas import ChatRequest, CommonRequest, CompletionRequest, parse
from teegpu import __version__
from teegpu.attested_tls import ATTESTATION_NONE, EVIDENCE_PATH
from teegpu.config import ApiConfig, EngineConfig, SchedulerConfig, SpeculativeConfig
from teegpu.errors import IntegrityError
from teegpu.model.loading import resolve_model_path
from teegpu.server_process import ServerProcess
from teegpu.tee.attestation import AttestedIdentity, model_sha256, quote_provider
from teegpu.tee.engine import Engine
from teegpu.tee.scheduler import Event, Scheduler, Sequence

READY_PREFIX = "teegpu api ready on "
DISCONNECT_POLL_S = 1.0  # how often a non-streamed request checks that its client is still there


class Service:
    """The engine and its scheduler thread, loaded after the HTTP server has started."""

    def __init__(self, api: ApiConfig, engine_config: EngineConfig, scheduler_config: SchedulerConfig,
                 identity: AttestedIdentity | None = None, evidence: dict | None = None,
                 speculative: SpeculativeConfig | None = None, server: ServerProcess | None = None):
        """`server`: the private GPU server, started already (Engine.open's `server`)."""
        self.api, self.engine_config, self.scheduler_config = api, engine_config, scheduler_config
        self.speculative, self.server = speculative, server
        self.attestation = identity.attestation if identity is not None else ATTESTATION_NONE
        self.evidence = evidence or {"attestation": ATTESTATION_NONE, "quote": None, "certificate": None,
                                     "privacy": engine_config.privacy, "pads": engine_config.pads,
                                     "versions": versions()}
        self.engine: Engine | None = None
        self.scheduler: Scheduler | None = None
        self.load_error: BaseException | None = None
        self.loaded = threading.Event()
        self.stop = threading.Event()
        self.metrics = ApiMetrics()
        self._last_totals: dict = {}  # the RPC telemetry's totals after the previous step
        self.model_id = model_id(engine_config.model)
        self.created = int(time.time())

    def load(self) -> None:
        try:
            self.engine = Engine.open(self.engine_config, server=self.server)
            self.scheduler = Scheduler(self.engine, self.scheduler_config, self.speculative)
            self.scheduler.on_step = self._observe_step
            threading.Thread(target=self.scheduler.run, args=(self.stop,), name="scheduler", daemon=True).start()
        except BaseException as e:
            self.load_error = e
        finally:
            self.loaded.set()

    def _observe_step(self, seconds: float, rows: int) -> None:
        m = self.metrics
        m.step.observe(seconds)
        m.step_rows.observe(rows)
        tel = self.engine.telemetry
        if tel is not None:
            totals, last = tel.totals, self._last_totals
            m.rpc.observe((totals["total_ms"] - last.get("total_ms", 0.0)) / 1000)
            m.server_compute.observe((totals["server_compute_ms"] - last.get("server_compute_ms", 0.0)) / 1000)
            self._last_totals = dict(totals)

    @property
    def system_fingerprint(self) -> str:
        return f"fp_{self.engine.weights.fingerprint[:16]}_{self.engine_config.privacy}"

    def ready(self) -> Scheduler:
        """The scheduler, or ApiError 503 while loading or after a failed load."""
        if not self.loaded.is_set():
            raise ApiError(503, "the model is still loading", code="loading")
        if self.load_error is not None:
            raise ApiError(503, f"the engine failed to start: {self.load_error}", code="engine_failed")
        return self.scheduler

    def close(self) -> None:
        self.stop.set()
        if self.scheduler is not None:
            self.scheduler.wake()
        if self.engine is not None:
            self.engine.close()


def model_id(model: str | None) -> str:
    """The id clients name the model by: the model file's stem (or the directory's name)."""
    path = resolve_model_path(model)
    return path.name if path.is_dir() else path.stem


def create_app(service: Service) -> FastAPI:
    app = FastAPI(title="teegpu", docs_url=None, redoc_url=None, openapi_url=None)
    _install_error_handlers(app)
    _install_info_routes(app, service)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(service, request, ChatRequest)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(service, request, CompletionRequest)

    return StatusCounter(app, service.metrics)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return e.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        message = f"no such path: {request.url.path}" if e.status_code == 404 else str(e.detail)
        return ApiError(e.status_code, message, code="not_found" if e.status_code == 404 else None).response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        return ApiError(400, str(e.errors()[0].get("msg", e))).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        return from_engine(e).response()


def _install_info_routes(app: FastAPI, service: Service) -> None:
    @app.get("/health")
    async def health():
        said = {"attestation": service.attestation}
        if not service.loaded.is_set():
            return JSONResponse({"status": "loading", **said}, status_code=503)
        if service.load_error is not None:
            return JSONResponse({"status": "error", "message": str(service.load_error), **said}, status_code=503)
        if not service.scheduler.server_ok:
            return JSONResponse({"status": "unavailable", "message": "the GPU server does not answer", **said},
                                status_code=503)
        return {"status": "ok", **said}

    @app.get(EVIDENCE_PATH)
    async def evidence():
        return service.evidence

    @app.get("/metrics")
    async def metrics():
        running, waiting = service.scheduler.counts() if service.scheduler else (0, 0)
        pool = getattr(service.engine.linears, "pool", None) if service.engine else None
        scheduler = service.scheduler
        prefix = scheduler.prefix if scheduler else None
        speculation = scheduler.speculation.as_dict() if scheduler and scheduler.speculative else None
        return Response(service.metrics.render(running, waiting, pool.stats.as_dict() if pool else None,
                                               prefix.stats if prefix else None, speculation),
                        media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(service.api, request)
        service.ready()
        return {"object": "list", "data": [model_card(service)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        check_auth(service.api, request)
        service.ready()
        if name != service.model_id:
            raise ApiError(404, f"The model `{name}` does not exist", param="model", code="model_not_found")
        return model_card(service)


def model_card(service: Service) -> dict:
    engine = service.engine
    return {"id": service.model_id, "object": "model", "created": service.created, "owned_by": "teegpu",
            "fingerprint": engine.weights.fingerprint, "privacy": service.engine_config.privacy,
            "pads": service.engine_config.pads,
            "verify": service.engine_config.verify, "max_model_len": engine.config.max_position_embeddings}


def check_auth(api: ApiConfig, request: Request) -> None:
    if api.api_key is None:
        return
    auth = request.headers.get("authorization", "")
    if auth != f"Bearer {api.api_key}":
        raise ApiError(401, "Incorrect API key provided" if auth else "Missing API key: send "
                       "'Authorization: Bearer KEY'", code="invalid_api_key")


async def read_json(request: Request, limit: int) -> object:
    """The body as JSON, refusing another declared media type (415) and one over `limit` bytes (413)
    before reading it all. A body without Content-Type is read as JSON (curl -d sends a form type)."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media and media != "application/json" and not media.endswith("+json"):
        raise ApiError(415, f"Content-Type {media!r} is not supported: send application/json",
                       code="unsupported_media_type")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise ApiError(413, f"request body of {length} bytes exceeds the limit of {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"We could not parse the JSON body of your request: {e}") from e


def prompt_ids(engine: Engine, prompt: str | list[int]) -> list[int]:
    """A completion prompt's token ids (ids given are checked against the vocabulary)."""
    if isinstance(prompt, str):
        return engine.encode(prompt)
    check_vocab(prompt, engine.config.vocab_size, "prompt")
    return list(prompt)


def prefix_salt(request: Request, req: CommonRequest) -> bytes:
    """Whose prefix cache blocks a request may hit: those sent with the same bearer token and the same
    `cache_salt` (docs/security.md: a hit is visible in the time to first token)."""
    return hashlib.sha256(b"\0".join([request.headers.get("authorization", "").encode(),
                                       (req.cache_salt or "").encode()])).digest()


def check_vocab(ids, vocab: int, param: str) -> None:
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise ApiError(400, f"{param} holds token id {bad}, outside the vocabulary [0, {vocab})", param=param)


async def complete(service: Service, request: Request, kind: type[CommonRequest]):
    """Both completion endpoints: validate, queue a sequence per prompt and choice (the n choices of
    a prompt share its prefill), answer whole or as a stream."""
    check_auth(service.api, request)
    scheduler = service.ready()
    req = parse(kind, await read_json(request, service.api.max_body_bytes))
    if req.model != service.model_id:
        raise ApiError(404, f"The model `{req.model}` does not exist", param="model", code="model_not_found")
    engine, chat = scheduler.engine, kind is ChatRequest
    prompts = [engine.encode(req.chat_messages(), chat=True)] if chat else [prompt_ids(engine, p)
                                                                           for p in req.prompts()]
    places = scheduler.config.max_batch + scheduler.config.max_queue
    if len(prompts) * req.choices > places:
        raise ApiError(400, f"{len(prompts)} prompt(s) x n={req.choices} exceed the {places} sequences this "
                       "server queues at once", param="n" if req.choices > 1 else "prompt")
    check_vocab([t for t, _ in req.token_bias()], engine.config.vocab_size, "logit_bias")
    echo = not chat and bool(req.echo)
    logprobs = req.logprob_count()
    call = Call(service, request, Reply("chat" if chat else "text", service.model_id, service.system_fingerprint),
                req.include_usage)
    salt = prefix_salt(request, req)
    try:
        for ids, given in zip(prompts, [None] if chat else req.prompts()):
            max_new = req.max_new_tokens(engine.config.max_position_embeddings - len(ids))
            leader = None
            for c in range(req.choices):
                gen = req.generation(max_new, logprobs, c, prompt_logprobs=echo and logprobs is not None)
                seq = scheduler.submit(ids, gen, on_event=call.listener(len(call.seqs)), leader=leader, salt=salt)
                leader = leader or seq
                call.add(seq, (given if isinstance(given, str) else engine.decode(ids)) if echo else None, c == 0)
    except Exception as e:
        call.cancel()
        raise from_engine(e, "messages" if chat else "prompt") from e
    call.prompt_tokens = sum(len(ids) for ids in prompts)
    service.metrics.prompt_tokens.inc(call.prompt_tokens)
    return await (call.stream() if req.stream else call.whole())


class Call:
    """One request's sequences (a choice each), turned into a response as their events arrive."""

    def __init__(self, service: Service, request: Request, reply: Reply, include_usage: bool):
        self.service, self.request, self.reply, self.include_usage = service, request, reply, include_usage
        self.seqs: list[Sequence] = []
        self.firsts: list[int] = []  # each prompt's first choice
        self.prompt_tokens = 0
        self.echoes: list[str | None] = []  # each choice's echoed prompt (completions with echo)
        self.events: asyncio.Queue = asyncio.Queue()  # (choice index, Event)
        self.loop = asyncio.get_running_loop()
        self.started = self.last = time.monotonic()
        self.tokens = 0

    def listener(self, index: int):
        return lambda e: self.loop.call_soon_threadsafe(self.events.put_nowait, (index, e))

    def add(self, seq: Sequence, echo: str | None, first: bool) -> None:
        if first:
            self.firsts.append(len(self.seqs))
        self.seqs.append(seq)
        self.echoes.append(echo)

    def cancel(self) -> None:
        for seq in self.seqs:
            if not seq.done.is_set():
                self.service.scheduler.cancel(seq)

    async def next_event(self) -> tuple[int, Event]:
        """The next (choice, event); cancels the sequences when the client has gone away meanwhile."""
        while True:
            try:
                item = await asyncio.wait_for(self.events.get(), DISCONNECT_POLL_S)
                break
            except asyncio.TimeoutError:
                if await self.request.is_disconnected():
                    self.cancel()
                    raise ApiError(499, "client closed the request")
        self._observe(item[1])
        return item

    def _observe(self, event: Event) -> None:
        m, now = self.service.metrics, time.monotonic()
        if isinstance(event.error, IntegrityError):
            m.integrity_failures.inc()
        out = sum(len(s.out) for s in self.seqs)
        if out > self.tokens:
            (m.ttft if self.tokens == 0 else m.itl).observe(now - (self.started if self.tokens == 0 else self.last))
            m.completion_tokens.inc(out - self.tokens)
            self.tokens, self.last = out, now

    def usage(self) -> dict:
        """Each prompt's tokens counted once (its n choices share them), every choice's completion, and
        the prompt tokens the prefix cache held."""
        cached = sum(self.seqs[i].cached_tokens for i in self.firsts)
        return usage(self.prompt_tokens, sum(s.completion_tokens for s in self.seqs), cached)

    def logprobs(self, index: int, entries: list, first: bool) -> list | None:
        """A choice's entries, led by its echoed prompt's in its first response."""
        seq = self.seqs[index]
        if seq.gen.logprobs is None:
            return None
        return (seq.prompt_logprobs + entries) if first and self.echoes[index] is not None else entries

    async def whole(self) -> dict:
        texts, entries = [[e or ""] for e in self.echoes], [[] for _ in self.seqs]
        choices, left = [None] * len(self.seqs), len(self.seqs)
        while left:
            index, event = await self.next_event()
            if event.error is not None:
                self.cancel()
                raise from_engine(event.error)
            texts[index].append(event.text)
            entries[index] += event.logprobs
            if event.finish_reason:
                choices[index] = self.reply.choice(index, "".join(texts[index]),
                                                   self.logprobs(index, entries[index], True),
                                                   event.finish_reason, False)
                left -= 1
        return self.reply.completion(choices, self.usage())

    async def stream(self) -> StreamingResponse:
        first = await self.next_event()  # an error before the first token still gets its HTTP status
        if first[1].error is not None:
            self.cancel()
            raise from_engine(first[1].error)
        return StreamingResponse(self._sse(first), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _sse(self, item: tuple[int, Event]):
        offsets: dict[int, int] = {}  # each opened choice's text so far, for its logprobs' text_offset
        try:
            left = len(self.seqs)
            while True:
                index, event = item
                if event.error is not None:
                    yield sse(from_engine(event.error).body())
                    return
                if index not in offsets:  # a choice opens with its role, or its echoed prompt
                    echo = self.echoes[index]
                    offsets[index] = len(echo or "")
                    if self.reply.kind == "chat":
                        yield sse(self.reply.chunk(index, "", role=True))
                    elif echo is not None:
                        yield sse(self.reply.chunk(index, echo, self.logprobs(index, [], True)))
                if event.text or event.logprobs or event.finish_reason:
                    yield sse(self.reply.chunk(index, event.text, self.logprobs(index, event.logprobs, False),
                                               event.finish_reason, offset=offsets[index]))
                    offsets[index] += len(event.text)
                left -= bool(event.finish_reason)
                if not left:
                    break
                item = await self.events.get()
                self._observe(item[1])
            if self.include_usage:
                yield sse(self.reply.usage_chunk(self.usage()))
            yield "data: [DONE]\n\n"
        finally:
            self.cancel()  # the client went away mid-stream, or the stream ended: nothing left running


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class StatusCounter:
    """ASGI wrapper counting every HTTP answer by path and status (streams included)."""

    def __init__(self, app, metrics: ApiMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in KNOWN_PATHS else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(path, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


KNOWN_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", EVIDENCE_PATH)


def run_api(api: ApiConfig, engine_config: EngineConfig, scheduler_config: SchedulerConfig,
            provider=None, speculative: SpeculativeConfig | None = None, server: ServerProcess | None = None) -> None:
    """Serve until SIGINT/SIGTERM; raise the engine's error if it could not start. `provider`
    (an object with `name` and `quote(report_data) -> bytes`) replaces --attestation's choice;
    `server`: the private GPU server, started already."""
    # otp: pads for the rows of two full decode steps stay ready (a prefill chunk may stall once)
    rows = max(engine_config.mask_pool_rows, 2 * scheduler_config.max_batch)
    identity, evidence, tls = None, None, {}
    if api.tls:
        identity, evidence = attested_identity(api, engine_config, provider)
        tls = dict(zip(("ssl_certfile", "ssl_keyfile"), identity.tls_files()))
    service = Service(api, dataclasses.replace(engine_config, mask_pool_rows=rows), scheduler_config, identity,
                      evidence, speculative, server)
    server = uvicorn.Server(uvicorn.Config(create_app(service), host=api.host, port=api.port, log_level="warning",
                                           lifespan="off", timeout_graceful_shutdown=5, **tls))
    threading.Thread(target=_load_and_announce, args=(service, server), name="loader", daemon=True).start()
    # uvicorn re-raises SIGTERM once it has shut down; as SystemExit it still lets us stop the GPU server
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.run()
    finally:
        service.close()
    if service.load_error is not None:
        raise service.load_error


def _load_and_announce(service: Service, server: uvicorn.Server) -> None:
    service.load()
    if service.load_error is not None:
        server.should_exit = True
        return
    while not server.started and not server.should_exit:
        time.sleep(0.05)
    if server.started:
        host, port = server.servers[0].sockets[0].getsockname()[:2]
        host = f"[{host}]" if ":" in host else host
        scheme = "https" if service.api.tls else "http"
        print(f"{READY_PREFIX}{scheme}://{host}:{port} (model {service.model_id}, privacy "
              f"{service.engine_config.privacy}, attestation {service.attestation})", flush=True)


def versions() -> dict:
    import torch

    return {"teegpu": __version__, "python": platform.python_version(), "torch": torch.__version__}


def attested_identity(api: ApiConfig, engine_config: EngineConfig, provider=None) -> tuple[AttestedIdentity, dict]:
    """The TLS identity, made before the HTTP server starts: its quote names the model file's SHA-256
    and the privacy mode (hashing the file takes a few seconds for a 1B model)."""
    provider = provider if provider is not None else quote_provider(api.attestation)
    model_hash = model_sha256(resolve_model_path(engine_config.model))
    identity = AttestedIdentity.create(provider, model_hash, engine_config.privacy, __version__, api.host,
                                       engine_config.pads)
    return identity, identity.evidence(model_hash, engine_config.privacy, versions(), engine_config.pads)
