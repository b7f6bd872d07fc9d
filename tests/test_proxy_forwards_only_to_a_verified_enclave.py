"""`teegpu proxy`: any OpenAI tool talks plain HTTP to localhost, and the proxy forwards only to
an upstream it verified (real `teegpu api --tls` processes quoting under the test PKI, a real
proxy process, the real openai client, sync and async, and curl)."""
import asyncio
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from api_process import ProxyProcess
from attested_api import MRENCLAVE, expect, proxy_args, start
from teegpu.client import attested_async_openai, attested_openai

API_KEY = "sk-upstream-secret"
CHAT = dict(messages=[{"role": "user", "content": "Say something about the sea."}], max_tokens=24, temperature=0)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("proxied")
    api, state = start(root, tiny_model_dir, api_args=("--api-key", API_KEY))
    yield api, state, root
    api.stop()


@pytest.fixture(scope="module")
def proxy(upstream, tiny_model_dir, tmp_path_factory):
    api, state, _ = upstream
    key_file = tmp_path_factory.mktemp("key") / "api-key"
    key_file.write_text(API_KEY + "\n")
    proc = ProxyProcess(api.url, *proxy_args(state, tiny_model_dir), "--api-key-file", str(key_file))
    yield proc
    assert proc.stop() == 0


def direct(upstream, tiny_model_dir) -> openai.OpenAI:
    api, state, _ = upstream
    return attested_openai(api.url, expected=expect(state, tiny_model_dir), api_key=API_KEY)


def test_the_proxy_verifies_first_and_says_what_it_checked(proxy, upstream):
    printed = "".join(proxy.stdout)
    assert "MRENCLAVE is the expected one" in printed and "binds the presented TLS key" in printed
    assert printed.index("binds the presented TLS key") < printed.index("teegpu proxy ready on")
    health = httpx.get(proxy.url + "/health")
    assert health.status_code == 200 and health.json()["verified"] is True
    report = httpx.get(proxy.url + "/v1/attestation").json()
    assert report["verified"] and report["error"] is None and report["upstream"] == upstream[0].url
    body = report["report"]
    assert body["measurement"] == f"MRENCLAVE {MRENCLAVE}" and body["tcb_status"] == "UpToDate"
    assert body["privacy"] == "plain" and body["tcb_info_date"] == "2024-01-01T00:00:00Z"
    assert any("binds the presented TLS key" in c for c in body["checks"]) and report["verified_at"]


def test_openai_clients_get_the_upstreams_answers_through_the_proxy(proxy, upstream, tiny_model_dir):
    want = direct(upstream, tiny_model_dir).chat.completions.create(model=Path(tiny_model_dir).name, **CHAT)
    local = openai.OpenAI(base_url=proxy.url + "/v1", api_key="ignored: the proxy holds the key")
    got = local.chat.completions.create(model=Path(tiny_model_dir).name, **CHAT)
    assert got.choices[0].message.content == want.choices[0].message.content
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (want.usage.prompt_tokens, want.usage.completion_tokens)
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       local.chat.completions.create(model=Path(tiny_model_dir).name, stream=True, **CHAT) if c.choices)
    assert streamed == want.choices[0].message.content
    assert [m.id for m in local.models.list()] == [m.id for m in direct(upstream, tiny_model_dir).models.list()]

    async def many():
        client = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="ignored")

        async def one():
            chunks = await client.chat.completions.create(model=Path(tiny_model_dir).name, stream=True, **CHAT)
            return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
        return await asyncio.gather(*(one() for _ in range(6)))

    assert asyncio.run(many()) == [want.choices[0].message.content] * 6


def test_streams_are_passed_on_as_they_arrive(proxy, tiny_model_dir):
    """The first event comes long before the answer's end (a buffering proxy sends both at once)."""
    body = {"model": Path(tiny_model_dir).name, "stream": True, "max_tokens": 160, "temperature": 0,
            "ignore_eos": True, "messages": CHAT["messages"]}
    started = time.perf_counter()
    with httpx.stream("POST", proxy.url + "/v1/chat/completions", json=body, timeout=120) as answer:
        reads = [(time.perf_counter() - started, chunk) for chunk in answer.iter_raw()]
    first = next(t for t, chunk in reads if b'"content"' in chunk)
    assert b"data: [DONE]" in reads[-1][1] and len(reads) > 10
    assert first < 0.5 * reads[-1][0]


def completion_tokens(api_url: str) -> float:
    with httpx.Client(verify=False) as raw:
        text = raw.get(api_url + "/metrics").text
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith("teegpu_completion_tokens_total")))


def test_an_app_that_hangs_up_stops_the_enclave_generating(proxy, upstream, tiny_model_dir):
    body = {"model": Path(tiny_model_dir).name, "stream": True, "max_tokens": 200, "temperature": 0,
            "ignore_eos": True, "messages": CHAT["messages"]}
    started = time.perf_counter()
    httpx.post(proxy.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=120)
    whole_s = time.perf_counter() - started  # what all 200 tokens take here
    before = completion_tokens(upstream[0].url)
    with httpx.stream("POST", proxy.url + "/v1/chat/completions", json=body, timeout=120) as answer:
        next(answer.iter_raw())  # one chunk, then hang up
    time.sleep(max(1.0, 1.5 * whole_s))  # all 200 tokens would be counted by now had it gone on
    assert completion_tokens(upstream[0].url) - before < 150


def test_the_upstream_is_verified_again_on_a_timer(upstream, tiny_model_dir):
    api, state, _ = upstream
    proc = ProxyProcess(api.url, *proxy_args(state, tiny_model_dir), "--reverify-s", "1")
    try:
        first = httpx.get(proc.url + "/v1/attestation").json()["verified_at"]
        assert _eventually(lambda: httpx.get(proc.url + "/v1/attestation").json()["verified_at"] != first, 10)
        assert httpx.get(proc.url + "/health").json()["verified"] is True
    finally:
        proc.stop()


def test_errors_come_back_unchanged(proxy, upstream, tiny_model_dir):
    bad = {"model": Path(tiny_model_dir).name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}
    headers = {"authorization": f"Bearer {API_KEY}"}
    with httpx.Client(verify=False) as raw:  # the same request, straight to the upstream
        want = raw.post(upstream[0].url + "/v1/chat/completions", json=bad, headers=headers)
    got = httpx.post(proxy.url + "/v1/chat/completions", json=bad)
    assert want.status_code == got.status_code == 400 and got.json() == want.json()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_streams_through_the_proxy(proxy, tiny_model_dir):
    body = json.dumps({"model": Path(tiny_model_dir).name, "stream": True, **CHAT})
    out = subprocess.run(["curl", "-sN", "-H", "content-type: application/json", "-d", body,
                          proxy.url + "/v1/chat/completions"], capture_output=True, text=True, timeout=120).stdout
    events = [line[6:] for line in out.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) > 3
    assert json.loads(events[0])["object"] == "chat.completion.chunk"


def test_without_a_key_file_the_users_key_is_forwarded(upstream, tiny_model_dir):
    api, state, _ = upstream
    proc = ProxyProcess(api.url, *proxy_args(state, tiny_model_dir))
    try:
        refused = httpx.get(proc.url + "/v1/models", headers={"authorization": "Bearer wrong"})
        assert refused.status_code == 401 and refused.json()["error"]["message"]
        assert httpx.get(proc.url + "/v1/models", headers={"authorization": f"Bearer {API_KEY}"}).status_code == 200
    finally:
        proc.stop()


@pytest.mark.parametrize("flag,value,message", [
    ("--mrenclave", "22" * 32, "MRENCLAVE"), ("--model-sha256", "00" * 32, "model SHA-256"),
    ("--privacy", "otp", "privacy mode plain is not the expected otp")])
def test_a_wrong_expectation_refuses_to_serve(upstream, tiny_model_dir, flag, value, message):
    api, state, _ = upstream
    proc = ProxyProcess(api.url, *proxy_args(state, tiny_model_dir, **{flag: value}), wait=False)
    status, printed = proc.finish()
    assert status != 0 and message in printed and "ready on" not in printed


def test_an_unreachable_upstream_is_named_and_nothing_is_served():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    proc = ProxyProcess(f"https://127.0.0.1:{port}", "--insecure-no-attestation", wait=False)
    status, printed = proc.finish()
    assert status != 0 and f"cannot reach https://127.0.0.1:{port}" in printed and "ready on" not in printed


def test_remote_listening_needs_its_flag(upstream, tiny_model_dir):
    api, state, _ = upstream
    proc = ProxyProcess(api.url, *proxy_args(state, tiny_model_dir), "--listen", "0.0.0.0:0", wait=False)
    status, printed = proc.finish()
    assert status != 0 and "--allow-remote" in printed and "ready on" not in printed
    proc = ProxyProcess(api.url, *proxy_args(state, tiny_model_dir), "--listen", "0.0.0.0:0", "--allow-remote")
    try:
        assert _eventually(lambda: "WARNING" in "".join(proc.stderr))  # printed before ready; read by a thread
        assert httpx.get(proc.url.replace("0.0.0.0", "127.0.0.1") + "/health").status_code == 200
    finally:
        proc.stop()


def _eventually(condition, timeout_s: float = 30) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def _port(url: str) -> str:
    return url.rsplit(":", 1)[1].strip("/")


def test_a_restarted_upstream_is_verified_again_before_traffic(tmp_path, tiny_model_dir):
    first, state = start(tmp_path, tiny_model_dir)
    port = _port(first.url)
    proc = ProxyProcess(first.url, *proxy_args(state, tiny_model_dir))
    local = openai.OpenAI(base_url=proc.url + "/v1", api_key="none", max_retries=0)
    try:
        want = local.chat.completions.create(model=Path(tiny_model_dir).name, **CHAT).choices[0].message.content
        key = httpx.get(proc.url + "/v1/attestation").json()["report"]["spki_sha256"]
        first.stop()
        liar, _ = start(tmp_path, tiny_model_dir, "--wrong-model-binding", state=state, api_args=("--port", port))
        with pytest.raises(openai.APIStatusError) as refused:
            local.chat.completions.create(model=Path(tiny_model_dir).name, **CHAT)
        assert refused.value.status_code == 502 and "model/mode binding" in refused.value.message
        assert httpx.get(proc.url + "/health").status_code == 503
        assert "model/mode binding" in httpx.get(proc.url + "/v1/attestation").json()["error"]
        liar.stop()
        second, _ = start(tmp_path, tiny_model_dir, state=state, api_args=("--port", port))
        try:
            assert _eventually(lambda: _answers(local, tiny_model_dir) == want)
            report = httpx.get(proc.url + "/v1/attestation").json()
            assert report["verified"] and report["report"]["spki_sha256"] != key
        finally:
            second.stop()
    finally:
        proc.stop()
        first.stop()


def _answers(client: openai.OpenAI, tiny_model_dir) -> str | None:
    try:
        return client.chat.completions.create(model=Path(tiny_model_dir).name, **CHAT).choices[0].message.content
    except openai.APIStatusError:
        return None


class CapturingUpstream:
    """A TLS server on the upstream's port that is no enclave: it records every byte it is sent."""

    def __init__(self, port: int, tmp_path: Path):
        from sgx_test_quotes import QuotesUnderTestRoot  # its root's key and certificate will do

        tmp_path.mkdir()
        QuotesUnderTestRoot.kept_in(tmp_path)
        data = (tmp_path / "pki-root.pem").read_bytes()
        split = data.index(b"-----BEGIN CERTIFICATE")
        key, cert = tmp_path / "capture.key", tmp_path / "capture.pem"
        key.write_bytes(data[:split])
        cert.write_bytes(data[split:])
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.listener = socket.create_server(("127.0.0.1", port))
        self.port = self.listener.getsockname()[1]
        self.received, self.connections = bytearray(), 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            try:
                with self.context.wrap_socket(conn, server_side=True) as tls:
                    tls.settimeout(2)
                    chunk = tls.recv(65536)
                    self.received += chunk
                    if chunk:
                        tls.sendall(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            except (OSError, ssl.SSLError):
                pass

    def close(self) -> None:
        self.listener.close()


def test_no_prompt_byte_reaches_an_unverified_upstream(tmp_path, tiny_model_dir):
    server, state = start(tmp_path, tiny_model_dir)
    proc = ProxyProcess(server.url, *proxy_args(state, tiny_model_dir))
    capture = None
    try:
        server.stop()
        capture = CapturingUpstream(int(_port(server.url)), tmp_path / "capture")
        secret = "the-launch-code-is-7731"
        answer = httpx.post(proc.url + "/v1/chat/completions", timeout=60,
                            json={"model": Path(tiny_model_dir).name, "messages": [{"role": "user", "content": secret}]})
        assert answer.status_code == 502 and answer.json()["error"]["code"] == "upstream_unverified"
        assert capture.connections >= 1  # the proxy did reach it: to verify it, never to forward
        assert secret.encode() not in capture.received and b"chat/completions" not in capture.received
    finally:
        if capture:
            capture.close()
        proc.stop()


def test_async_openai_is_pinned_like_the_sync_client(upstream, tiny_model_dir, tmp_path):
    api, state, _ = upstream
    impostor = CapturingUpstream(0, tmp_path / "impostor")  # another key on another port

    async def chat():
        client = await attested_async_openai(api.url, expected=expect(state, tiny_model_dir), api_key=API_KEY)
        assert client.teegpu_attestation.measurement == f"MRENCLAVE {MRENCLAVE}"
        answer = await client.chat.completions.create(model=Path(tiny_model_dir).name, **CHAT)
        moved = client.with_options(base_url=f"https://127.0.0.1:{impostor.port}/v1", max_retries=0)
        with pytest.raises(openai.APIConnectionError):
            await moved.chat.completions.create(model=Path(tiny_model_dir).name, **CHAT)
        return answer.choices[0].message.content

    try:
        got = asyncio.run(chat())
    finally:
        impostor.close()
    assert impostor.connections == 1 and impostor.received == b""  # the handshake failed: no byte sent
    assert got == direct(upstream, tiny_model_dir).chat.completions.create(
        model=Path(tiny_model_dir).name, **CHAT).choices[0].message.content
