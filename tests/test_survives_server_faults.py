"""A dying server costs a user a few hundred milliseconds, not the answer: requests are asked
again within their deadline on a fresh socket, a pool fails over, a server with other weights
is refused while the others serve, and a standard ZeroMQ broker can sit in between."""
import signal
import socket
import threading

import pytest
import zmq

from conftest import save_tiny_llama
from teegpu.config import GenerationConfig, ServerConfig
from teegpu.model.loading import load_weights
from teegpu.model.tokenizer import load_tokenizer
from teegpu.server_process import ServerProcess
from teegpu.tee.engine import Engine

GEN = GenerationConfig(max_new_tokens=60, stop_at_eos=False)
PROMPT = "Once upon a time, in a land far away,"


def free_tcp() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def start(model_dir, endpoint: str) -> ServerProcess:
    proc = ServerProcess(ServerConfig(model=str(model_dir), endpoint=endpoint))
    proc.wait_ready()
    return proc


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return tiny_model_dir, load_weights(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def undisturbed(tiny):
    model_dir, weights, tok = tiny
    with start(model_dir, free_tcp()) as server, Engine.connect(weights, tok, server.endpoint) as engine:
        return engine.generate(PROMPT, GEN).token_ids


def generate_while(engine, at_token: int, fault) -> list[int]:
    """Generate, calling fault() once when `at_token` tokens have been streamed."""
    count = [0]

    def on_text(_):
        count[0] += 1
        if count[0] == at_token:
            fault()

    return engine.generate(PROMPT, GEN, on_text=on_text).token_ids


@pytest.mark.parametrize("data_plane", ["shm", "socket"])
def test_server_killed_and_restarted_mid_generation(tiny, undisturbed, data_plane):
    model_dir, weights, tok = tiny
    endpoint = free_tcp()
    servers = [start(model_dir, endpoint)]

    def kill_and_restart():
        servers[0].proc.send_signal(signal.SIGKILL)
        servers[0].proc.wait()
        threading.Thread(target=lambda: servers.append(start(model_dir, endpoint)), daemon=True).start()

    try:
        with Engine.connect(weights, tok, endpoint, timeout_ms=20_000, data_plane=data_plane) as engine:
            assert generate_while(engine, 10, kill_and_restart) == undisturbed
            stats = engine.client.stats
            assert stats.retries >= 1
    finally:
        for s in servers:
            s.stop()


def test_pool_fails_over_and_refuses_a_server_with_other_weights(tiny, undisturbed, tmp_path):
    model_dir, weights, tok = tiny
    save_tiny_llama(tmp_path, seed=2)  # same shapes, other weights
    first, other, second = start(model_dir, free_tcp()), start(tmp_path, free_tcp()), start(model_dir, free_tcp())
    pool = ",".join(s.endpoint for s in (first, other, second))
    try:
        with Engine.connect(weights, tok, pool, timeout_ms=15_000, data_plane="shm") as engine:
            tokens = generate_while(engine, 10, lambda: first.proc.send_signal(signal.SIGKILL))
            assert tokens == undisturbed
            assert engine.client.endpoint.url == second.endpoint and engine.client.stats.failovers >= 2
    finally:
        for s in (first, other, second):
            s.stop()


def test_a_server_that_comes_back_rejoins_the_pool(tiny, undisturbed):
    model_dir, weights, tok = tiny
    a_url, b_url = free_tcp(), free_tcp()
    a, b = start(model_dir, a_url), start(model_dir, b_url)
    servers = [a, b]
    try:
        with Engine.connect(weights, tok, f"{a_url},{b_url}", timeout_ms=15_000) as engine:
            a.proc.send_signal(signal.SIGKILL)
            a.proc.wait()
            assert engine.generate(PROMPT, GEN).token_ids == undisturbed  # on b
            servers.append(start(model_dir, a_url))  # a is back...
            b.proc.send_signal(signal.SIGKILL)
            assert engine.generate(PROMPT, GEN).token_ids == undisturbed  # ...and serves when b dies
            assert engine.client.endpoint.url == a_url
    finally:
        for s in servers:
            s.stop()


def test_through_a_standard_zmq_proxy_with_two_servers_behind(tiny, undisturbed):
    """zmq.proxy(ROUTER, DEALER) spreads the requests over two servers; the envelope brings every
    reply back to its client."""
    model_dir, weights, tok = tiny
    servers = [start(model_dir, free_tcp()), start(model_dir, free_tcp())]
    ctx = zmq.Context()
    front, back, control = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER), ctx.socket(zmq.PAIR)
    front.bind("tcp://127.0.0.1:*")
    for s in servers:
        back.connect(s.endpoint)
    control.bind("inproc://proxy-control")
    steer = ctx.socket(zmq.PAIR)
    steer.connect("inproc://proxy-control")
    thread = threading.Thread(target=zmq.proxy_steerable, args=(front, back, None, control), daemon=True)
    thread.start()
    try:
        url = front.getsockopt_string(zmq.LAST_ENDPOINT)
        with Engine.connect(weights, tok, url, timeout_ms=15_000, data_plane="socket") as engine:
            assert engine.generate(PROMPT, GEN).token_ids == undisturbed
        # a client that asked for shared memory finds out that its region is not known everywhere
        with Engine.connect(weights, tok, url, timeout_ms=15_000, data_plane="shm", control_plane="socket") as engine:
            assert engine.generate(PROMPT, GEN).token_ids == undisturbed
            assert engine.client.data_plane == "socket"
        assert all(s.proc.poll() is None for s in servers)
    finally:
        steer.send(b"TERMINATE")
        thread.join(5)
        for sock in (front, back, control, steer):
            sock.close(0)
        ctx.term()
        for s in servers:
            s.stop()
