"""The server socket: a ROUTER that never lets a malformed message escape as a crash.

Messages follow ZeroMQ's envelope convention (as REQ/REP do): every frame before the first
empty one is routing (the ROUTER's identity of the peer, and one more per broker in between),
then the empty delimiter, then the header and the tensor frames. Replies carry the envelope
back, so a standard device (zmq.proxy(ROUTER, DEALER), a load-balancing broker) can sit
between clients and servers unchanged.
"""
from __future__ import annotations

import struct
import time
from dataclasses import dataclass

import zmq

from teegpu.protocol import encode_header, peek_ids
from teegpu.transport.curve import ServerCurve
from teegpu.transport.endpoint import parse_endpoint

EVENTS, POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)  # plain ints: pyzmq's flag enums cost microseconds


@dataclass(slots=True)
class Incoming:
    """One received request: where it came from, its header and its tensor frames."""

    envelope: list  # routing frames, as received
    header: memoryview | bytes
    frames: list
    legacy: bool = False  # no delimiter: a peer of protocol 2, answered in its framing
    identity: bytes = b""  # the key, where the receiver knows it already (a doorbell's client)

    @property
    def key(self) -> bytes:
        """The sender's identity across brokers (length-prefixed routing frames)."""
        return self.identity or b"".join(struct.pack("<H", len(f)) + bytes(f) for f in self.envelope)


def split_envelope(msg: list) -> Incoming | None:
    """[routing..., b"", header, *frames] as an Incoming; None for a message with no header."""
    frames = [f.buffer if hasattr(f, "buffer") else memoryview(f) for f in msg]
    for i, f in enumerate(frames):
        if f.nbytes == 0:
            if i == 0 or i + 1 >= len(frames):
                return None
            return Incoming(frames[:i], frames[i + 1], frames[i + 2:])
    if len(frames) < 2:
        return None
    return Incoming(frames[:1], frames[1], frames[2:], legacy=True)


class ServerSocket:
    def __init__(self, endpoint: str, context: zmq.Context | None = None, curve: ServerCurve | None = None):
        self.endpoint = parse_endpoint(endpoint)
        self._ctx = context or zmq.Context.instance()
        self.socket = self._ctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self._auth = curve.apply(self.socket, self._ctx) if curve is not None else None
        self.socket.bind(self.endpoint.url)
        # tcp://host:0 or :* picks a free port; report the one actually bound
        self.bound_url = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def recv(self, timeout_ms: int, spin_us: int = 0) -> Incoming | None:
        """One request, or None after timeout_ms (or for a message without a header).

        With spin_us, first poll without sleeping for that long: a blocked thread's
        wake-up costs more than the gap between the requests of one decode step.
        """
        if spin_us:
            deadline = time.perf_counter_ns() + spin_us * 1000
            while time.perf_counter_ns() < deadline:
                try:
                    return split_envelope(self.socket.recv_multipart(zmq.NOBLOCK, copy=False))
                except zmq.Again:
                    pass
        if timeout_ms == 0:  # a look between doorbell polls: cheap
            if not self.socket.getsockopt(EVENTS) & POLLIN:
                return None
        elif not self.socket.poll(timeout_ms, zmq.POLLIN):
            return None
        return split_envelope(self.socket.recv_multipart(copy=False))

    def reply(self, to: Incoming, header: bytes, frames) -> None:
        delimiter = [] if to.legacy else [b""]
        self.socket.send_multipart([*to.envelope, *delimiter, header, *frames], copy=False)

    def reply_error(self, to: Incoming, raw_header, code: int, message: str) -> None:
        """Answer with an error code and a message, echoing the request id when readable."""
        rid, op, layer = peek_ids(raw_header)
        self.reply(to, encode_header(op, rid, layer, (), status=code), [message.encode("utf-8")])

    def close(self) -> None:
        self.socket.close(linger=0)
        if self._auth is not None:
            self._auth.stop()

