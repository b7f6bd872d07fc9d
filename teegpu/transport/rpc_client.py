"""The client socket: one request in flight, matched by id, under a monotonic deadline.

Follows the ZeroMQ guide's Lazy Pirate client: a DEALER socket, replies matched on
the request id (late replies to an abandoned request are dropped), LINGER 0, and the
socket reopened after a timeout so that nothing stale is left queued.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import zmq

from teegpu.errors import ServerError, ServerUnavailable
from teegpu.protocol import ErrorCode, decode_header, encode_header, tensor_frame, tensors_from_frames
from teegpu.transport.endpoint import parse_endpoint


@dataclass(slots=True)
class RpcStats:
    """Running totals; cheap enough to keep always."""

    calls: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0

    def as_dict(self) -> dict:
        return {"calls": self.calls, "bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received}


class RpcClient:
    def __init__(self, endpoint: str, timeout_ms: int = 60_000, context: zmq.Context | None = None):
        if timeout_ms <= 0:
            raise ValueError(f"timeout_ms must be positive, got {timeout_ms}")
        self.endpoint = parse_endpoint(endpoint)
        self.timeout_ms = timeout_ms
        self.stats = RpcStats()
        self._ctx = context or zmq.Context.instance()
        self._next_id = 1
        self.last_stamps: tuple[int, ...] = (0,) * 6
        self.last_sizes = (0, 0)
        self._socket: zmq.Socket | None = None
        self._open()

    def _open(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint.url)
        self._socket = sock

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    def __enter__(self) -> "RpcClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def call(self, op: int, layer: int, tensors=(), *, header: bytes | None = None, frames=None,
             started_ns: int | None = None):
        """Send one request and wait for its reply.

        Returns (header, payload) where payload is a list of tensors, or the bytes
        of the HELLO reply. `header`/`frames` override the encoded request: tests use
        them to send malformed messages. Afterwards `last_stamps` holds perf_counter_ns
        at start, serialized, sent, reply ready, received, deserialized; `last_sizes`
        the bytes sent and received.
        """
        t0 = started_ns or time.perf_counter_ns()
        rid = self._next_id
        self._next_id += 1
        tensors = list(tensors)
        head = header if header is not None else encode_header(op, rid, layer, tensors)
        body = frames if frames is not None else [tensor_frame(t) for t in tensors]
        t1 = time.perf_counter_ns()
        self._socket.send_multipart([head, *body], copy=False)
        t2 = time.perf_counter_ns()
        sent = len(head) + sum(memoryview(b).nbytes for b in body)
        reply, t3 = self._wait_reply(rid if header is None else None, op)
        t4 = time.perf_counter_ns()
        rhead = decode_header(reply[0].buffer)
        received = sum(f.buffer.nbytes for f in reply)
        st = self.stats
        st.calls += 1
        st.bytes_sent += sent
        st.bytes_received += received
        self.last_sizes = (sent, received)
        if rhead.status != ErrorCode.OK:
            message = bytes(reply[1].buffer).decode("utf-8", "replace") if len(reply) > 1 else ""
            raise ServerError(rhead.status, message)
        if rhead.op == 0:  # HELLO: one JSON frame
            payload = bytes(reply[1].buffer) if len(reply) > 1 else b""
        else:
            payload = tensors_from_frames(rhead.tensors, reply[1:])
        self.last_stamps = (t0, t1, t2, t3, t4, time.perf_counter_ns())
        return rhead, payload

    def _wait_reply(self, rid: int | None, op: int) -> tuple[list, int]:
        """The matching reply and the perf_counter_ns at which it was ready to read."""
        deadline = time.monotonic() + self.timeout_ms / 1000
        while True:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0 or not self._socket.poll(remaining_ms, zmq.POLLIN):
                self.close()
                self._open()
                raise ServerUnavailable(
                    f"no reply from {self.endpoint.url} to op {op} within {self.timeout_ms} ms "
                    "(server gone or stalled)"
                )
            ready_ns = time.perf_counter_ns()
            reply = self._socket.recv_multipart(copy=False)
            if rid is None or decode_header(reply[0].buffer).request_id == rid:
                return reply, ready_ns
            # a late reply to an abandoned request: drop it and keep waiting
