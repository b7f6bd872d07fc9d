"""Malformed requests get a typed error reply and the server keeps serving; a dead
server makes the client raise within its deadline instead of hanging."""
import os
import signal
import struct
import time

import pytest
import torch

from teegpu.errors import ServerError, ServerUnavailable
from teegpu.protocol import ErrorCode, Op, encode_header, tensor_frame
from teegpu.transport import RpcClient

HIDDEN = 64


def good_call(client):
    _, (y,) = client.call(Op.QKV, 0, [torch.randn(2, HIDDEN)])
    assert y.shape == (2, 4 * 16 + 2 * 2 * 16)


def expect_error(client, code, **call):
    with pytest.raises(ServerError) as info:
        client.call(**call)
    assert info.value.code == code, str(info.value)
    assert str(info.value)  # names the problem
    good_call(client)  # still serving
    return str(info.value)


def test_each_bad_request_gets_its_error(tiny_server):
    client = RpcClient(tiny_server.endpoint, timeout_ms=5_000)
    good_call(client)
    x = torch.randn(2, HIDDEN)
    expect_error(client, ErrorCode.UNKNOWN_METHOD, op=99, layer=0, tensors=[x])
    msg = expect_error(client, ErrorCode.BAD_LAYER, op=Op.QKV, layer=3, tensors=[x])
    assert "layer 3" in msg
    expect_error(client, ErrorCode.BAD_LAYER, op=Op.LM_HEAD, layer=0, tensors=[x])
    msg = expect_error(client, ErrorCode.BAD_DTYPE, op=Op.QKV, layer=0, tensors=[x.double()])
    assert "float64" in msg
    expect_error(client, ErrorCode.BAD_SHAPE, op=Op.QKV, layer=0, tensors=[torch.randn(2, HIDDEN + 1)])
    expect_error(client, ErrorCode.BAD_SHAPE, op=Op.DOWN, layer=0, tensors=[x])
    expect_error(client, ErrorCode.BAD_FRAMES, op=Op.QKV, layer=0, tensors=[x, x])
    # truncated tensor frame: the header promises 2x64 floats, the frame carries fewer bytes
    header = encode_header(Op.QKV, 1, 0, [x])
    msg = expect_error(client, ErrorCode.BAD_FRAMES, op=Op.QKV, layer=0, header=header,
                       frames=[bytes(tensor_frame(x))[:100]])
    assert "100 bytes" in msg
    expect_error(client, ErrorCode.BAD_FRAMES, op=Op.QKV, layer=0, header=header, frames=[])
    expect_error(client, ErrorCode.BAD_FRAMES, op=Op.QKV, layer=0, header=header[:10], frames=[])
    bad_version = struct.pack("<H", 99) + header[2:]
    msg = expect_error(client, ErrorCode.BAD_VERSION, op=Op.QKV, layer=0, header=bad_version,
                       frames=[tensor_frame(x)])
    assert "99" in msg
    client.close()


def test_killed_server_raises_within_deadline(tiny_server):
    client = RpcClient(tiny_server.endpoint, timeout_ms=1_500)
    good_call(client)
    os.kill(tiny_server.proc.pid, signal.SIGSTOP)  # frozen while the request is in flight...
    start = time.monotonic()
    with pytest.raises(ServerUnavailable, match="1500 ms"):
        os.kill(tiny_server.proc.pid, signal.SIGKILL)  # ...and killed
        client.call(Op.QKV, 0, [torch.randn(2, HIDDEN)])
    assert time.monotonic() - start < 3.0
    with pytest.raises(ServerUnavailable):  # the reopened socket also gives up, it does not hang
        client.call(Op.QKV, 0, [torch.randn(2, HIDDEN)])
    client.close()


def test_stalled_server_raises_and_stale_reply_is_dropped(tiny_server):
    """A reply that arrives after the deadline belongs to an abandoned request and is never
    taken for the answer to the next one."""
    client = RpcClient(tiny_server.endpoint, timeout_ms=800)
    good_call(client)
    os.kill(tiny_server.proc.pid, signal.SIGSTOP)
    with pytest.raises(ServerUnavailable):
        client.call(Op.QKV, 0, [torch.randn(2, HIDDEN)])
    os.kill(tiny_server.proc.pid, signal.SIGCONT)
    x = torch.randn(1, HIDDEN)
    _, (y,) = client.call(Op.QKV, 0, [x])
    assert y.shape == (1, 128)
    client.close()
