"""The shared-memory data plane: tensors go through a plain file under /dev/shm, only the
header crosses the socket, and every case it cannot serve falls back to sockets, saying so."""
import os
import signal

import pytest
import torch

from raw_requests import raw_error
from teegpu.errors import ProtocolError, ServerError, ServerUnavailable
from teegpu.protocol import FLAG_SHM, HEADER_BASE_BYTES, ErrorCode, Op, encode_header
from teegpu.config import ServerConfig
from teegpu.server_process import ServerProcess
from teegpu.transport import RpcClient, ShmRegion
from teegpu.transport.shm_region import SHM_DIR

HIDDEN, QKV_OUT = 64, 4 * 16 + 2 * 2 * 16


def call(client, *args):
    """(reply header, the one result tensor) of a call."""
    reply = client.call(*args)
    return reply.header, reply.tensors[0]


def sent_frames(client):
    """Record the byte length of every frame the client puts on its socket."""
    log, send = [], client._socket.send_multipart

    def spy(frames, **kw):
        log.append([memoryview(f).nbytes for f in frames])
        return send(frames, **kw)

    client._socket.send_multipart = spy
    return log


def test_tensors_bypass_the_socket_and_results_match(tiny_server):
    x = torch.randn(3, HIDDEN)
    with RpcClient(tiny_server.endpoint, 5_000) as plain, \
            RpcClient(tiny_server.endpoint, 5_000, data_plane="shm", control_plane="socket") as shm:
        assert shm.data_plane == "shm"
        # the region is a plain file directly under /dev/shm, only ours to read ...
        path = os.path.join(SHM_DIR, shm.shm.name)
        assert os.path.dirname(path) == SHM_DIR and os.stat(path).st_mode & 0o777 == 0o600
        _, want = call(plain, Op.QKV, 1, [x])
        want = want.clone()
        log = sent_frames(shm)
        reply = shm.call(Op.QKV, 1, [x])
        head, got = reply.header, reply.tensors[0]
        assert head.flags & FLAG_SHM and torch.equal(got, want) and got.shape == (3, QKV_OUT)
        assert log[-1] == [0, HEADER_BASE_BYTES + 18]  # the delimiter and the header with one tensor descriptor
        assert reply.sent >= x.numel() * 4  # the tensor bytes are still counted
        # ... whose name is gone once the server has mapped it: a killed client leaves nothing behind
        assert not os.path.exists(path)
        head, again = call(shm, Op.QKV, 1, [x])
        assert head.flags & FLAG_SHM and torch.equal(again, want)


def test_after_a_timeout_the_client_attaches_a_fresh_region(tiny_server):
    """A timeout reopens the socket; the server then knows the client by a new identity, so the
    client attaches a new region (the old name is gone) and keeps the shared-memory plane."""
    x = torch.randn(2, HIDDEN)
    with RpcClient(tiny_server.endpoint, 1_000, data_plane="shm") as client:
        _, want = call(client, Op.QKV, 0, [x])
        want, first = want.clone(), client.shm.name
        os.kill(tiny_server.proc.pid, signal.SIGSTOP)  # a stalled server
        try:
            with pytest.raises(ServerUnavailable):
                client.call(Op.QKV, 0, [x])
        finally:
            os.kill(tiny_server.proc.pid, signal.SIGCONT)
        head, got = call(client, Op.QKV, 0, [x])
        assert client.data_plane == "shm" and client.shm.name != first
        assert head.flags & FLAG_SHM and torch.equal(got, want)


def test_message_larger_than_the_region_goes_inline(tiny_server):
    with RpcClient(tiny_server.endpoint, 5_000, data_plane="shm", shm_bytes=8192) as client:  # 4 KB doorbell page, 4 KB of tensors
        small, big = torch.randn(1, HIDDEN), torch.randn(40, HIDDEN)  # 40 rows: 10 KB in, 20 KB out
        head, y = call(client, Op.QKV, 0, [small])
        assert head.flags & FLAG_SHM
        head, y = call(client, Op.QKV, 0, [big])
        assert not head.flags & FLAG_SHM and y.shape == (40, QKV_OUT)


def test_reply_that_does_not_fit_comes_inline(tiny_server):
    """Request fits the region, reply would not: the server answers in frames, nothing cut."""
    with RpcClient(tiny_server.endpoint, 5_000, data_plane="shm", shm_bytes=8192) as client:  # 4 KB doorbell page, 4 KB of tensors
        x = torch.randn(12, HIDDEN)  # 3 KB request, 7.7 KB reply
        head, y = call(client, Op.QKV, 0, [x])
        assert not head.flags & FLAG_SHM and y.shape == (12, QKV_OUT)


def test_remote_peer_falls_back_with_a_message(capsys):
    client = RpcClient("tcp://192.0.2.7:5555", 1_000, data_plane="shm")
    assert client.data_plane == "socket"
    assert "not known to be on this host" in capsys.readouterr().err
    client.close()


def test_server_that_refuses_shm_means_sockets(tiny_model_dir, capsys):
    config = ServerConfig(model=str(tiny_model_dir), endpoint="tcp://127.0.0.1:*", data_plane="socket")
    with ServerProcess(config) as server, RpcClient(server.wait_ready(), 5_000, data_plane="shm") as client:
        head, y = call(client, Op.QKV, 0, [torch.randn(2, HIDDEN)])
        assert client.data_plane == "socket" and not head.flags & FLAG_SHM and y.shape == (2, QKV_OUT)
        assert "--data-plane socket" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["../etc/passwd", "teegpu-a/b", "other-name", "teegpu-does-not-exist"])
def test_server_rejects_bad_region_names(tiny_server, name):
    with RpcClient(tiny_server.endpoint, 5_000) as client:
        with pytest.raises(ServerError) as e:
            client.call(Op.ATTACH_SHM, 0, payload=name.encode())
        assert e.value.code == ErrorCode.BAD_SHM
        client.call(Op.QKV, 0, [torch.randn(1, HIDDEN)])  # still serving


def test_shm_request_without_a_region_is_refused(tiny_server):
    error = raw_error(tiny_server.endpoint, [encode_header(Op.QKV, 0, 0, [torch.empty(1, HIDDEN)], flags=FLAG_SHM)])
    assert error.code == ErrorCode.BAD_SHM and "not attached" in str(error)


def test_region_views_and_bounds():
    region = ShmRegion.create(1 << 13)
    try:
        other = ShmRegion.attach(region.name)
        region.tensor(64, torch.float32, (4,)).copy_(torch.arange(4.0))
        assert torch.equal(other.tensor(64, torch.float32, (4,)), torch.arange(4.0))  # the same memory
        with pytest.raises(ProtocolError, match="exceed"):
            region.tensor(8000, torch.float32, (100,))
        other.close()
    finally:
        region.close()


def test_region_views_work_in_and_out_of_inference_mode():
    """Views are reused: one made inside torch.inference_mode (a forward pass) must still take
    writes outside it (a tool calling the client directly), and the other way round."""
    region = ShmRegion.create(1 << 13)
    try:
        with torch.inference_mode():
            region.tensor(4096, torch.float32, (4,)).copy_(torch.ones(4))
        region.tensor(4096, torch.float32, (4,)).copy_(torch.arange(4.0))
        with torch.inference_mode():
            assert torch.equal(region.tensor(4096, torch.float32, (4,)), torch.arange(4.0))
    finally:
        region.close()
