"""Sending hand-made frames to a server: malformed headers, wrong frame counts, truncated
tensors. Production clients always encode their own requests and match replies by id; this
helper is the test suite's way around both."""
from __future__ import annotations

import zmq

from teegpu.errors import ServerError
from teegpu.protocol import ErrorCode, decode_header


def send_raw(endpoint: str, frames: list, timeout_ms: int = 5_000, delimiter: bool = True) -> list[bytes]:
    """Send one message of raw frames (after the envelope's empty delimiter, unless told not to:
    a protocol-2 peer) on a fresh DEALER socket; return the reply's frames after the delimiter."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send_multipart([b""] * delimiter + [bytes(f) for f in frames])
        if not sock.poll(timeout_ms, zmq.POLLIN):
            raise AssertionError(f"no reply from {endpoint} within {timeout_ms} ms")
        reply = sock.recv_multipart()
        return reply[1:] if reply and reply[0] == b"" else reply
    finally:
        sock.close(linger=0)


def raw_error(endpoint: str, frames: list, delimiter: bool = True) -> ServerError:
    """The error a server answers to raw frames (fails if it answers OK)."""
    reply = send_raw(endpoint, frames, delimiter=delimiter)
    head = decode_header(reply[0])
    assert head.status != ErrorCode.OK, "the server accepted a malformed request"
    return ServerError(head.status, reply[1].decode() if len(reply) > 1 else "")
