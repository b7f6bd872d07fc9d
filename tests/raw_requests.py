"""Sending hand-made frames to a server: malformed headers, wrong frame counts, truncated
tensors. Production clients always encode their own requests and match replies by id; this
helper is the test suite's way around both."""
from __future__ import annotations

import zmq

from teegpu.errors import ServerError
from teegpu.protocol import ErrorCode, decode_header


def send_raw(endpoint: str, frames: list, timeout_ms: int = 5_000) -> list[bytes]:
    """Send one message of raw frames on a fresh DEALER socket; return the reply's frames."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send_multipart([bytes(f) for f in frames])
        if not sock.poll(timeout_ms, zmq.POLLIN):
            raise AssertionError(f"no reply from {endpoint} within {timeout_ms} ms")
        return sock.recv_multipart()
    finally:
        sock.close(linger=0)


def raw_error(endpoint: str, frames: list) -> ServerError:
    """The error a server answers to raw frames (fails if it answers OK)."""
    reply = send_raw(endpoint, frames)
    head = decode_header(reply[0])
    assert head.status != ErrorCode.OK, "the server accepted a malformed request"
    return ServerError(head.status, reply[1].decode() if len(reply) > 1 else "")
