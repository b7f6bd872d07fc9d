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

from raw_requests import raw_error

HIDDEN = 64


def good_call(client):
    y = client.call(Op.QKV, 0, [torch.randn(2, HIDDEN)]).tensors[0]
    assert y.shape == (2, 4 * 16 + 2 * 2 * 16)


X = torch.randn(2, HIDDEN)
# (case, call arguments, expected code, text the message must contain)
BAD_CALLS = [
    ("unknown op", dict(op=99, layer=0, tensors=[X]), ErrorCode.UNKNOWN_METHOD, "unknown op 99"),
    ("layer out of range", dict(op=Op.QKV, layer=3, tensors=[X]), ErrorCode.BAD_LAYER, "layer 3"),
    ("lm head with a layer", dict(op=Op.LM_HEAD, layer=0, tensors=[X]), ErrorCode.BAD_LAYER, "layer -1"),
    ("wrong dtype", dict(op=Op.QKV, layer=0, tensors=[X.double()]), ErrorCode.BAD_DTYPE, "float64"),
    ("wrong width", dict(op=Op.QKV, layer=0, tensors=[torch.randn(2, HIDDEN + 1)]), ErrorCode.BAD_SHAPE, "65"),
    ("width of another op", dict(op=Op.DOWN, layer=0, tensors=[X]), ErrorCode.BAD_SHAPE, "DOWN"),
    ("two tensors", dict(op=Op.QKV, layer=0, tensors=[X, X]), ErrorCode.BAD_FRAMES, "got 2"),
    ("pads from a plain server", dict(op=Op.PADS, layer=0, tensors=[torch.zeros(4, dtype=torch.int64)]),
     ErrorCode.UNKNOWN_METHOD, "otp mode only"),
    ("a pad key to a plain server", dict(op=Op.PAD_KEY, layer=0, payload=bytes(24)), ErrorCode.UNKNOWN_METHOD,
     "otp mode only"),
]
HEADER = encode_header(Op.QKV, 1, 0, [X])
BAD_FRAMES = [
    ("truncated tensor frame", [HEADER, bytes(tensor_frame(X))[:100]], ErrorCode.BAD_FRAMES, "100 bytes"),
    ("tensor frame missing", [HEADER], ErrorCode.BAD_FRAMES, "has 0"),
    ("header cut short", [HEADER[:10]], ErrorCode.BAD_FRAMES, "header frame of 10 bytes"),
    ("other protocol version", [struct.pack("<H", 99) + HEADER[2:], tensor_frame(X)], ErrorCode.BAD_VERSION, "99"),
]


@pytest.mark.parametrize("case,call,code,text", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_request_gets_its_error(tiny_server, case, call, code, text):
    with RpcClient(tiny_server.endpoint, timeout_ms=5_000) as client:
        with pytest.raises(ServerError) as info:
            client.call(**call)
        assert info.value.code == code and text in str(info.value), str(info.value)
        good_call(client)  # still serving


@pytest.mark.parametrize("case,frames,code,text", BAD_FRAMES, ids=[c[0] for c in BAD_FRAMES])
def test_malformed_message_gets_its_error(tiny_server, case, frames, code, text):
    error = raw_error(tiny_server.endpoint, frames)
    assert error.code == code and text in str(error), str(error)
    with RpcClient(tiny_server.endpoint, timeout_ms=5_000) as client:
        good_call(client)  # still serving


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
    y = client.call(Op.QKV, 0, [x]).tensors[0]
    assert y.shape == (1, 128)
    client.close()


def test_a_protocol_2_peer_is_told_the_versions(tiny_server):
    """Protocol 2 had no envelope delimiter: such a peer gets, in its own framing, an error that
    names both versions."""
    old = struct.pack("<H", 2) + HEADER[2:]
    error = raw_error(tiny_server.endpoint, [old, tensor_frame(X)], delimiter=False)
    assert error.code == ErrorCode.BAD_VERSION and "protocol version 2, this side speaks 3" in str(error)
