"""The shared-memory doorbell: requests announced by polled words in the region instead of
ZeroMQ messages. Results are exact on every path (doorbell, ring of a sleeping server, reply
to a sleeping client, socket control plane), the sleep/wake race is closed, a dead peer is
noticed, a client waiting for a long product naps, and an idle server costs no CPU."""
import errno
import math
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
import torch

from teegpu.config import ServerConfig
from teegpu.errors import ServerError, ServerUnavailable
from teegpu.model.loading import load_weights
from teegpu.protocol import WIRE_DTYPES, Op
from teegpu.server.linear_server import LinearServer
from teegpu.server_process import ServerProcess
from teegpu.transport import RpcClient, ServerSocket, rpc_client
from teegpu.transport.doorbell import ASLEEP, futex_wake
from teegpu.transport.rpc_client import FUTEX_MISSES

HIDDEN = 64


def product(client, x: torch.Tensor, layer: int = 1) -> tuple[torch.Tensor, str]:
    reply = client.call(Op.QKV, layer, [x])
    return reply.tensors[0].clone(), reply.path


def test_every_path_gives_the_same_product(tiny_server):
    x = torch.randn(3, HIDDEN)
    url = tiny_server.endpoint
    with RpcClient(url, 5_000) as plain, RpcClient(url, 5_000, data_plane="shm", control_plane="socket") as shm, \
            RpcClient(url, 5_000, data_plane="shm") as bell:
        want, path = product(plain, x)
        assert path == "socket"
        got, path = product(shm, x)
        assert path == "shm" and torch.equal(got, want)
        product(bell, x)  # attaches the region
        assert bell.doorbell
        sends = count_sends(bell)
        paths = set()
        for _ in range(20):
            before = len(sends)
            got, path = product(bell, x)
            assert torch.equal(got, want)
            if path == "doorbell":  # both sides were polling: not one message on the socket
                assert len(sends) == before
            paths.add(path)
        assert all(p.startswith("doorbell") for p in paths), paths


def count_sends(client) -> list:
    """Every message the client puts on its socket, from now on."""
    log, sock = [], client._socket
    for name in ("send", "send_multipart"):
        original = getattr(sock, name)
        setattr(sock, name, lambda *a, _send=original, **kw: (log.append(a), _send(*a, **kw))[1])
    return log


def test_a_sleeping_server_is_rung_over_the_socket(tiny_server):
    """After its polling window the server sleeps on its socket; the next request rings it."""
    x = torch.randn(2, HIDDEN)
    with RpcClient(tiny_server.endpoint, 5_000, data_plane="shm") as client:
        want, _ = product(client, x)
        time.sleep(0.3)  # longer than any polling window (2 ms at most)
        got, path = product(client, x)
        assert path.startswith("doorbell-ring") and torch.equal(got, want)


@pytest.mark.parametrize("sleeps_on", ["futex", "socket"])
def test_a_sleeping_client_is_woken_by_the_reply(tiny_server, sleeps_on):
    """A product slower than the client's polling window: it sleeps on the futex of its reply
    word and the server wakes it there, or (where futexes do not reach it) on its socket, where
    the server sends the reply."""
    x = torch.randn(2, HIDDEN)
    with RpcClient(tiny_server.endpoint, 5_000, data_plane="shm") as client:
        want, _ = product(client, x)
        if sleeps_on == "socket":
            client.futex_misses, client.futex_retry_at = FUTEX_MISSES, math.inf
        os.kill(tiny_server.proc.pid, signal.SIGSTOP)  # the server stalls longer than the window...
        timer = threading.Timer(0.2, os.kill, (tiny_server.proc.pid, signal.SIGCONT))
        timer.start()
        got, path = product(client, x)  # ...and answers after the client went to sleep
        timer.join()
        assert path.endswith("-waited" if sleeps_on == "futex" else "-slept") and torch.equal(got, want)


def sleeping_client(url: str, monkeypatch, timeout_ms: int = 5_000) -> RpcClient:
    """A doorbell client that sleeps from the start of every wait, as on oversubscribed cores."""
    client = RpcClient(url, timeout_ms, data_plane="shm")
    monkeypatch.setattr(client.cpu_wait, "contended", lambda: True)
    return client


def test_a_stale_wake_up_puts_a_waiting_client_back_to_sleep(tiny_server, monkeypatch):
    """A wake-up that finds no reply (the server's wake for the previous reply, which the client saw
    before the wake came) must not send the client to its socket: it sleeps on the futex again."""
    with sleeping_client(tiny_server.endpoint, monkeypatch) as client:
        x = torch.randn(2, HIDDEN)
        want, _ = product(client, x)
        os.kill(tiny_server.proc.pid, signal.SIGSTOP)  # the reply comes only after the stale wake-up
        stale = threading.Timer(0.05, futex_wake, (client.shm.doorbell.reply_address,))
        resume = threading.Timer(0.3, os.kill, (tiny_server.proc.pid, signal.SIGCONT))
        stale.start()
        resume.start()
        got, path = product(client, x)
        stale.join()
        resume.join()
        assert path.endswith("-waited") and torch.equal(got, want), path


def test_an_error_reply_wakes_a_waiting_client(tiny_server, monkeypatch):
    """Errors come on the socket; the server wakes a client asleep on its futex for them too (the
    futex's own timeout made longer than the call's deadline: only the wake-up can end the wait)."""
    monkeypatch.setattr(rpc_client, "FUTEX_SLICE_S", 60.0)
    with sleeping_client(tiny_server.endpoint, monkeypatch, timeout_ms=30_000) as client:
        assert product(client, torch.randn(2, HIDDEN))[1].endswith("-waited")
        os.kill(tiny_server.proc.pid, signal.SIGSTOP)  # the error comes after the client fell asleep
        timer = threading.Timer(0.2, os.kill, (tiny_server.proc.pid, signal.SIGCONT))
        timer.start()
        start = time.monotonic()
        with pytest.raises(ServerError, match="layer"):
            client.call(Op.QKV, 99, [torch.randn(2, HIDDEN)])
        timer.join()
        assert time.monotonic() - start < 5.0  # not at the try's deadline (10 s): the server woke it
        assert product(client, torch.randn(2, HIDDEN))[0].shape == (2, 128)  # and it serves on


@pytest.mark.parametrize("futex", ["never woken", "refused"])
def test_wake_ups_that_never_come_send_the_client_to_its_socket(tiny_server, monkeypatch, capfd, futex):
    """Inside an SGX enclave the futex is the LibOS's own and the server's wake-ups never reach it
    (simulated here: the real kernel is not in the way). The client notices the waits that ran out
    with the reply there (or a futex refused outright) and sleeps on its socket from then on."""
    monkeypatch.setattr(rpc_client, "FUTEX_SLICE_S", 0.01)
    x = torch.randn(2, HIDDEN)
    with RpcClient(tiny_server.endpoint, 5_000) as plain:
        want, _ = product(plain, x)
    with sleeping_client(tiny_server.endpoint, monkeypatch) as client:
        product(client, x)  # attaches the region
        never = (lambda seq, s: (time.sleep(s), errno.ETIMEDOUT)[1]) if futex == "never woken" else \
            (lambda seq, s: errno.ENOSYS)
        monkeypatch.setattr(client.shm.doorbell, "wait_reply", never)
        paths = []
        for _ in range(FUTEX_MISSES + 2):
            got, path = product(client, x)
            assert torch.equal(got, want)
            paths.append(path)
    assert paths[-1].endswith("-slept") and client.futex_misses == FUTEX_MISSES, paths
    assert "futex wake-ups do not reach this process" in capfd.readouterr().err


def test_wake_ups_that_were_only_late_get_the_futex_back(tiny_model_dir, monkeypatch, capfd):
    """Missed wake-ups may also be late ones (a server descheduled between its reply and its wake-up
    on a loaded host): after FUTEX_RETRY_S on its socket the client tries the futex again, keeps it
    when the wake-ups come, and goes back to its socket (without saying so again) when they do not.
    A server 5 ms slow, so that every reply comes while the client sleeps."""
    monkeypatch.setattr(rpc_client, "FUTEX_SLICE_S", 0.01)
    monkeypatch.setattr(rpc_client, "FUTEX_RETRY_S", 0.3)
    sock, stop, thread = serve_in_thread(
        SlowServer(load_weights(str(tiny_model_dir)), torch.device("cpu"), WIRE_DTYPES["float32"]))
    x = torch.randn(2, HIDDEN)
    try:
        with sleeping_client(sock.bound_url, monkeypatch) as client:
            want, _ = product(client, x)
            bell = client.shm.doorbell
            bell.wait_reply = lambda seq, s: (time.sleep(s), errno.ETIMEDOUT)[1]  # wake-ups stop reaching us
            for _ in range(FUTEX_MISSES):
                product(client, x)
            assert client.futex_misses == FUTEX_MISSES
            assert product(client, x)[1].endswith("-slept")  # on the socket for FUTEX_RETRY_S
            time.sleep(0.35)
            product(client, x)  # one more try, missed: back to the socket
            assert client.futex_misses == FUTEX_MISSES and product(client, x)[1].endswith("-slept")
            del bell.wait_reply  # the kernel's futex again: wake-ups reach us
            time.sleep(0.35)
            got, path = product(client, x)
            assert path.endswith("-waited") and client.futex_misses == 0 and torch.equal(got, want), path
    finally:
        stop.set()
        thread.join(5)
        sock.close()
    assert capfd.readouterr().err.count("futex wake-ups do not reach this process") == 1


class DrowsyServer(LinearServer):
    """A real server that dawdles between announcing sleep and looking at the doorbells again:
    the window in which a client may post while reading the server as awake or asleep."""

    def _announce(self, state: int) -> None:
        super()._announce(state)
        if state == ASLEEP:
            time.sleep(0.02)


class SlowServer(LinearServer):
    """A real server whose every product takes 5 ms more, like a large layer on a CPU."""

    def _compute(self, op, layer, inputs, out):
        time.sleep(0.005)
        return super()._compute(op, layer, inputs, out)


def serve_in_thread(server: LinearServer):
    sock = ServerSocket("tcp://127.0.0.1:*")
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(sock, stop), kwargs={"spin_max_us": 200}, daemon=True)
    thread.start()
    return sock, stop, thread


@pytest.fixture()
def drowsy_server(tiny_model_dir):
    sock, stop, thread = serve_in_thread(
        DrowsyServer(load_weights(str(tiny_model_dir)), torch.device("cpu"), WIRE_DTYPES["float32"]))
    yield sock.bound_url
    stop.set()
    thread.join(5)
    sock.close()


def test_a_long_product_is_awaited_asleep_not_spinning(tiny_model_dir):
    """Waiting 5 ms for each reply, the client naps (a few wake-ups per wait) instead of polling:
    its thread's CPU time stays a small share of the wall time (spinning the last quarter of each
    wait, as the client did before, took a quarter), and every reply still comes by the doorbell."""
    sock, stop, thread = serve_in_thread(
        SlowServer(load_weights(str(tiny_model_dir)), torch.device("cpu"), WIRE_DTYPES["float32"]))
    try:
        with RpcClient(sock.bound_url, 5_000, data_plane="shm") as client:
            for _ in range(10):  # learn the wait
                product(client, torch.randn(1, HIDDEN))
            cpu, wall, paths = time.thread_time(), time.monotonic(), set()
            for _ in range(60):
                paths.add(product(client, torch.randn(1, HIDDEN))[1])
            cpu, wall = time.thread_time() - cpu, time.monotonic() - wall
        assert not any(p.endswith(("-slept", "-waited")) for p in paths), paths  # the naps caught every reply
        assert cpu < 0.12 * wall, f"{cpu * 1000:.0f} ms of CPU in {wall * 1000:.0f} ms of waiting"
    finally:
        stop.set()
        thread.join(5)
        sock.close()


def test_posting_in_the_race_window_is_never_lost(drowsy_server):
    """Requests at every phase of the server's falling asleep complete with the right product,
    well inside their deadline (a lost wake-up would wait the whole 5 s)."""
    x = torch.randn(2, HIDDEN)
    with RpcClient(drowsy_server, 5_000) as plain, RpcClient(drowsy_server, 5_000, data_plane="shm") as bell:
        want, _ = product(plain, x)
        paths = set()
        for i in range(40):
            time.sleep(0.0005 * (i % 10))  # land anywhere in the 20 ms window, before and after it
            start = time.monotonic()
            got, path = product(bell, x)
            assert torch.equal(got, want) and time.monotonic() - start < 1.0
            paths.add(path)
        assert any(p.startswith("doorbell-ring") for p in paths), paths  # some landed while it slept


def test_several_clients_each_with_a_doorbell(tiny_server):
    xs = [torch.randn(2, HIDDEN) for _ in range(3)]
    with RpcClient(tiny_server.endpoint, 5_000) as plain:
        wants = [product(plain, x)[0] for x in xs]
    clients = [RpcClient(tiny_server.endpoint, 5_000, data_plane="shm") for _ in xs]
    try:
        for _ in range(10):
            for client, x, want in zip(clients, xs, wants):
                assert torch.equal(product(client, x)[0], want)
    finally:
        for c in clients:
            c.close()


def test_server_killed_while_polling_is_noticed_within_the_deadline(tiny_server):
    with RpcClient(tiny_server.endpoint, 1_500, data_plane="shm") as client:
        product(client, torch.randn(1, HIDDEN))
        os.kill(tiny_server.proc.pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(ServerUnavailable):
            product(client, torch.randn(1, HIDDEN))
        assert time.monotonic() - start < 3.0


SPINNING_CLIENT = """
import sys, torch
from teegpu.protocol import Op
from teegpu.transport import RpcClient
client = RpcClient(sys.argv[1], 5_000, data_plane="shm")
print("ready", flush=True)
while True:
    client.call(Op.QKV, 0, [torch.randn(1, 64)])
"""


def test_client_killed_while_polling_leaves_the_server_serving(tiny_server):
    proc = subprocess.Popen([sys.executable, "-c", SPINNING_CLIENT, tiny_server.endpoint], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.3)
    proc.kill()
    proc.wait()
    with RpcClient(tiny_server.endpoint, 5_000, data_plane="shm") as client:
        for _ in range(5):
            assert product(client, torch.randn(2, HIDDEN))[0].shape == (2, 128)


def test_idle_server_with_a_silent_client_costs_no_cpu(tiny_model_dir):
    config = ServerConfig(model=str(tiny_model_dir), endpoint="tcp://127.0.0.1:*")
    with ServerProcess(config) as server, RpcClient(server.wait_ready(), 5_000, data_plane="shm") as client:
        for _ in range(50):  # traffic first, so that the server's polling window is at its widest
            product(client, torch.randn(1, HIDDEN))
        proc = psutil.Process(server.proc.pid)
        before, start = sum(proc.cpu_times()[:2]), time.monotonic()
        time.sleep(5)
        used = sum(proc.cpu_times()[:2]) - before
        assert used / (time.monotonic() - start) < 0.02, f"{used:.3f} s of CPU in 5 s idle"
