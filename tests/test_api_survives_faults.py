"""The API under faults of the GPU server and of its own load: each gets its HTTP status and
OpenAI error object (503 unreachable, 500 integrity_error, 429 queue full, one SSE error event
mid-stream), and the service keeps serving afterwards."""
import json
import os
import signal
import socket
import time

import httpx
import pytest

from api_process import ApiProcess
from openai_schema import validate
from teegpu.config import ServerConfig
from teegpu.server_process import ServerProcess
from test_tampering_is_detected import TamperingProxy


@pytest.fixture()
def gpu_server(tiny_model_dir):
    with ServerProcess(ServerConfig(model=str(tiny_model_dir), endpoint="tcp://127.0.0.1:*")) as proc:
        proc.wait_ready()
        yield proc


def body(api, n: int = 8, **kw) -> dict:
    return {"model": api.model_id, "prompt": "Once upon a time", "max_tokens": n, "temperature": 0, **kw}


def start_api(model_dir, server: str, *args: str) -> ApiProcess:
    api = ApiProcess("--model", str(model_dir), "--server", server, "--data-plane", "socket", *args)
    api.model_id = os.path.basename(model_dir)  # a HF directory's model id is its name
    return api


def post(api, **kw) -> httpx.Response:
    return httpx.post(api.url + "/v1/completions", json=body(api, **kw), timeout=60)


def wait_health(api, status: int, timeout_s: float = 15) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if httpx.get(api.url + "/health").status_code == status:
            return True
        time.sleep(0.2)
    return False


def test_unreachable_gpu_server_is_503_then_recovers(tiny_model_dir, gpu_server):
    api = start_api(tiny_model_dir, gpu_server.endpoint, "--timeout-ms", "1500")
    try:
        assert post(api).status_code == 200
        os.kill(gpu_server.proc.pid, signal.SIGSTOP)
        try:
            r = post(api)
            assert r.status_code == 503 and r.json()["error"]["code"] == "gpu_server_unavailable"
            validate("ErrorResponse", r.json())
            assert wait_health(api, 503)
            # a stream that fails before its first token gets the status too
            r = httpx.post(api.url + "/v1/completions", json=body(api, stream=True), timeout=60)
            assert r.status_code == 503
        finally:
            os.kill(gpu_server.proc.pid, signal.SIGCONT)
        assert wait_health(api, 200)
        assert post(api).status_code == 200
    finally:
        assert api.stop() == 0


def test_failure_mid_stream_sends_one_error_event(tiny_model_dir, gpu_server):
    api = start_api(tiny_model_dir, gpu_server.endpoint, "--timeout-ms", "1500")
    try:
        events = []
        with httpx.stream("POST", api.url + "/v1/completions", json=body(api, n=240, stream=True),
                          timeout=60) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 3:
                        os.kill(gpu_server.proc.pid, signal.SIGSTOP)
        os.kill(gpu_server.proc.pid, signal.SIGCONT)
        assert "[DONE]" not in events
        errors = [json.loads(e) for e in events if "error" in json.loads(e)]
        assert len(errors) == 1 and errors[0]["error"]["code"] == "gpu_server_unavailable"
        assert wait_health(api, 200) and post(api).status_code == 200
    finally:
        api.stop()


def test_lying_server_is_500_integrity_error(tiny_model_dir, gpu_server):
    proxy = TamperingProxy(gpu_server.endpoint, "noise", start=0)
    api = start_api(tiny_model_dir, proxy.url, "--verify")
    try:
        r = post(api)
        assert r.status_code == 500, r.text
        assert r.json()["error"]["type"] == "integrity_error"
        assert "teegpu_integrity_failures_total 1.0" in httpx.get(api.url + "/metrics").text
        assert httpx.get(api.url + "/health").status_code == 200  # the server answers; it lies
    finally:
        api.stop()
        proxy.stop.set()


def test_full_queue_is_429(tiny_model_dir, gpu_server):
    api = start_api(tiny_model_dir, gpu_server.endpoint, "--max-batch", "1", "--max-queue", "0")
    try:
        with httpx.stream("POST", api.url + "/v1/completions", json=body(api, n=200, stream=True),
                          timeout=60) as first:
            lines = first.iter_lines()
            next(lines)
            os.kill(gpu_server.proc.pid, signal.SIGSTOP)  # the first sequence holds the only place...
            try:
                r = post(api)
                assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
                validate("ErrorResponse", r.json())
            finally:
                os.kill(gpu_server.proc.pid, signal.SIGCONT)  # ...until it finishes
            assert [line for line in lines if line][-1] == "data: [DONE]"
        assert post(api).status_code == 200  # a place again
    finally:
        api.stop()


def test_health_is_503_while_the_model_loads():
    """The HTTP side is up before the model (and its private GPU server): /health says so."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    api = ApiProcess("--port", str(port), wait=False)
    try:
        seen = []
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and (not seen or seen[-1] != 200):
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/health")
                seen.append(r.status_code)
                if r.status_code == 503:
                    assert r.json() == {"status": "loading", "attestation": "none"}
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(0.05)
        assert seen and seen[0] == 503 and seen[-1] == 200
    finally:
        api.stop()
