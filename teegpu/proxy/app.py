"""`teegpu proxy`: plain OpenAI API on localhost, forwarded only to a verified teegpu enclave.

At start the proxy runs `teegpu verify`'s checks and refuses to serve if one fails. Afterwards it
forwards every /v1 route over connections pinned to the attested key, streaming each answer as it
arrives; re-verifies every --reverify-s and whenever the upstream presents a new key; and answers
502 with an OpenAI error object naming the failed check instead of forwarding. `/` is a chat page
that shows what was verified. docs/security.md says what this guarantees: the user's own machine
(where the proxy runs) is trusted.
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import signal
import socket
import sys
from pathlib import Path

import anyio
import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from teegpu.client import key_changed, verify_server
from teegpu.config import ProxyConfig, VerifyConfig
from teegpu.errors import ConfigError
from teegpu.proxy.upstream import Unverified, Upstream

READY_PREFIX = "teegpu proxy ready on "
STATIC = Path(__file__).with_name("static")
# hop-by-hop headers (RFC 9110 7.6.1) and those the proxy sets itself
DROPPED = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
           "transfer-encoding", "upgrade", "host", "content-length", "accept-encoding"}


def error(status: int, message: str, code: str) -> JSONResponse:
    """An OpenAI error object, as the upstream would give it."""
    return JSONResponse({"error": {"message": message, "type": "upstream_error", "param": None, "code": code}},
                        status_code=status)


def create_app(upstream: Upstream, api_key: str | None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(upstream.keep_verified())
        yield
        task.cancel()
        await upstream.close()

    app = FastAPI(title="teegpu proxy", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/")
    async def chat_page():
        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-store"})

    @app.get("/health")
    async def health():
        ok = upstream.http is not None
        return JSONResponse({"status": "ok" if ok else "unverified", "verified": ok, "upstream": upstream.url,
                             "error": upstream.error}, status_code=200 if ok else 503)

    @app.get("/v1/attestation")
    async def attestation():
        return upstream.report()

    @app.api_route("/v1/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def forward(path: str, request: Request):
        return await forward_request(upstream, request, api_key)

    return app


async def forward_request(upstream: Upstream, request: Request, api_key: str | None) -> Response:
    """The request, sent only over a pinned connection; the answer streamed back as it comes."""
    headers = {k: v for k, v in request.headers.items() if k.lower() not in DROPPED}
    headers["accept-encoding"] = "identity"  # passed through byte for byte, chunk by chunk
    if api_key is not None:
        headers["authorization"] = f"Bearer {api_key}"
    body = await request.body()
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    for attempt in range(2):  # a second only after a new key passed verification; every path returns
        try:
            http = upstream.client()
        except Unverified as e:
            await upstream.reverify("a request while unverified")  # at most every few seconds
            try:
                http = upstream.client()
            except Unverified:
                return error(502, f"the upstream is not verified, nothing was forwarded: {e}", "upstream_unverified")
        sent = http.build_request(request.method, target, headers=headers, content=body)
        try:
            answer = await http.send(sent, stream=True)
        except httpx.ConnectError as e:
            if key_changed(e) and attempt == 0:  # nothing was sent: verify the new key, then try again
                await upstream.reverify("the upstream presents a new TLS key", stale=http)
                continue
            return error(502, f"cannot reach the upstream {upstream.url}: {e}", "upstream_unreachable")
        except httpx.HTTPError as e:
            return error(502, f"the upstream failed: {e!r}", "upstream_failed")
        kept = {k: v for k, v in answer.headers.items() if k.lower() not in DROPPED - {"content-length"}}
        return StreamingResponse(relay(answer), status_code=answer.status_code, headers=kept)


async def relay(answer: httpx.Response):
    """The upstream's bytes as they come. However the relay ends (the app closed its connection
    mid-stream included), the upstream stream is closed too, so that the enclave stops generating."""
    try:
        async for chunk in answer.aiter_raw():
            yield chunk
    finally:
        with anyio.CancelScope(shield=True):
            await answer.aclose()


def check_listen(config: ProxyConfig) -> tuple[str, int]:
    """Loopback unless --allow-remote (then a warning): the proxy forwards with the user's trust."""
    host, port = config.listen_address()
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        if not config.allow_remote:
            raise ConfigError(f"--listen {config.listen} is not a loopback address: anyone who reaches it would use "
                              "your verified upstream; pass --allow-remote if that is what you want")
        print(f"teegpu proxy: WARNING: listening on {host}, not loopback: whoever reaches it uses the verified "
              "upstream" + (" with your API key" if config.api_key_file else ""), file=sys.stderr, flush=True)
    return host, port


def read_api_key(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        key = Path(path).read_text().strip()
    except OSError as e:
        raise ConfigError(f"--api-key-file {path}: {e.strerror}") from e
    if not key or any(c.isspace() for c in key):
        raise ConfigError(f"--api-key-file {path}: expected one API key on one line")
    return key


def run_proxy(config: ProxyConfig, expected: VerifyConfig, report=print) -> None:
    """Verify the upstream (AttestationError if a check fails: nothing is served), then serve until
    SIGINT/SIGTERM. `report(verified)` shows the checks before the ready line."""
    host, port = check_listen(config)
    api_key = read_api_key(config.api_key_file)
    verified = verify_server(config.upstream, expected)
    report(verified)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)  # connections made once the ready line is out wait for uvicorn in the backlog
    bound = sock.getsockname()[1]
    app = create_app(Upstream(config, expected, verified), api_key)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    where = f"[{host}]" if ":" in host else host
    print(f"{READY_PREFIX}http://{where}:{bound} (forwarding to {config.upstream}, verified: "
          f"{verified.measurement or 'no quote'}, privacy {verified.privacy})", flush=True)
    # uvicorn re-raises SIGTERM once it has shut down: an exit, not a death by signal
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.run(sockets=[sock])

