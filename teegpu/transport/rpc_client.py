"""The client socket: one request in flight, matched by id, under a monotonic deadline.

Follows the ZeroMQ guide's Lazy Pirate client: a DEALER socket, replies matched on
the request id (late replies to an abandoned request are dropped), LINGER 0, and the
socket reopened after a timeout so that nothing stale is left queued.

With `data_plane="shm"` the tensors go through a region under /dev/shm and only the
header crosses the socket (see shm_region.py); a message too large for the region
goes inline, and a server that cannot map the region (another host) means sockets,
said once on stderr.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch
import zmq

from teegpu.errors import ConfigError, ProtocolError, ServerError, ServerUnavailable
from teegpu.protocol import (
    ALIGN, FLAG_SHM, ErrorCode, Op, TensorDesc, decode_header, encode_header, shm_offsets, tensor_frame,
    tensors_from_frames,
)
from teegpu.transport.curve import ClientCurve
from teegpu.transport.endpoint import parse_endpoint, same_host_reason
from teegpu.transport.shm_region import DEFAULT_BYTES, ShmRegion

DATA_PLANES = ("socket", "shm")


@dataclass(slots=True)
class RpcStats:
    """Running totals; cheap enough to keep always."""

    calls: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0

    def as_dict(self) -> dict:
        return {"calls": self.calls, "bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received}


class RpcClient:
    def __init__(self, endpoint: str, timeout_ms: int = 60_000, context: zmq.Context | None = None,
                 data_plane: str = "socket", shm_bytes: int = DEFAULT_BYTES, curve: ClientCurve | None = None):
        if timeout_ms <= 0:
            raise ValueError(f"timeout_ms must be positive, got {timeout_ms}")
        if data_plane not in DATA_PLANES:
            raise ConfigError(f"data plane {data_plane!r}: choose one of {DATA_PLANES}")
        self.endpoint = parse_endpoint(endpoint)
        self.timeout_ms = timeout_ms
        self.curve = curve
        self.stats = RpcStats()
        self._ctx = context or zmq.Context.instance()
        self._next_id = 1
        self.last_stamps: tuple[int, ...] = (0,) * 6
        self.last_sizes = (0, 0)
        self._socket: zmq.Socket | None = None
        self.shm: ShmRegion | None = None
        self._attached = False
        if data_plane == "shm":
            reason = same_host_reason(self.endpoint)
            if reason is None:
                self.shm = ShmRegion.create(shm_bytes)
            else:
                self._fall_back(reason)
        self._open()

    @property
    def data_plane(self) -> str:
        return "shm" if self.shm is not None else "socket"

    def _fall_back(self, reason: str) -> None:
        print(f"teegpu: shared-memory data plane unavailable: {reason}; using sockets", file=sys.stderr, flush=True)
        if self.shm is not None:
            self.shm.close()
            self.shm = None

    def _open(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if self.curve is not None:
            self.curve.apply(sock)
        sock.connect(self.endpoint.url)
        self._socket = sock
        self._attached = False  # the server knows regions by socket identity

    def _close_socket(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    def close(self) -> None:
        self._close_socket()
        if self.shm is not None:
            self.shm.close()
            self.shm = None

    def __enter__(self) -> "RpcClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _attach(self) -> None:
        """Tell the server the name of our region, then remove the name (both keep their mapping);
        fall back to sockets if it cannot map it. After a reconnect, a fresh region."""
        self._attached = True
        if not self.shm.owner:  # named no longer: the server we reconnect to needs a new one
            size = self.shm.size
            self.shm.close()
            self.shm = ShmRegion.create(size)
        try:
            self.call(Op.ATTACH_SHM, 0, frames=[self.shm.name.encode()])
        except ServerError as e:
            if e.code not in (ErrorCode.BAD_SHM, ErrorCode.UNKNOWN_METHOD):
                raise
            self._fall_back(f"the server cannot map it ({e})")
            return
        self.shm.unlink()

    def call(self, op: int, layer: int, tensors=(), *, dtype: torch.dtype | None = None,
             header: bytes | None = None, frames=None, started_ns: int | None = None):
        """Send one request and wait for its reply.

        Tensors are sent as `dtype` when given (the conversion is part of the copy into
        the message). Returns (header, payload) where payload is a list of tensors, or
        the bytes of the HELLO reply. Reply tensors may be views of the shared region,
        valid until the next call: copy what you keep. `header`/`frames` override the
        encoded request: tests use them to send malformed messages. Afterwards
        `last_stamps` holds perf_counter_ns at start, serialized, sent, reply ready,
        received, deserialized; `last_sizes` the bytes sent and received (tensor bytes
        count whichever plane carried them).
        """
        t0 = started_ns or time.perf_counter_ns()
        if self.shm is not None and not self._attached and op != Op.ATTACH_SHM:
            self._attach()
        rid = self._next_id
        self._next_id += 1
        descs = [TensorDesc(dtype or t.dtype, tuple(t.shape)) for t in tensors]
        flags, request_end = 0, 0
        if header is not None:
            head, body = header, list(frames or ())
        else:
            if self.shm is not None and descs:
                offsets, request_end = shm_offsets(descs)
                if request_end <= self.shm.size:  # else the tensors go inline
                    flags = FLAG_SHM
                    for t, d, off in zip(tensors, descs, offsets):
                        self.shm.tensor(off, d.dtype, d.shape).copy_(t)
            head = encode_header(op, rid, layer, descs, flags=flags)
            if flags:
                body = []
            elif frames is not None:
                body = list(frames)
            else:
                body = [tensor_frame(t.to(dtype) if dtype is not None else t) for t in tensors]
        t1 = time.perf_counter_ns()
        self._socket.send_multipart([head, *body], copy=False)
        t2 = time.perf_counter_ns()
        sent = len(head) + sum(memoryview(b).nbytes for b in body) + (request_end if flags else 0)
        reply, t3 = self._wait_reply(rid if header is None else None, op)
        t4 = time.perf_counter_ns()
        rhead = decode_header(reply[0].buffer)
        received = sum(f.buffer.nbytes for f in reply)
        if rhead.status != ErrorCode.OK:
            self._count(sent, received)
            message = bytes(reply[1].buffer).decode("utf-8", "replace") if len(reply) > 1 else ""
            raise ServerError(rhead.status, message)
        if rhead.op in (Op.HELLO, Op.ATTACH_SHM):  # one JSON / text frame
            payload = bytes(reply[1].buffer) if len(reply) > 1 else b""
        elif rhead.flags & FLAG_SHM:
            payload = self._shm_reply(rhead, request_end if flags else 0, len(reply))
            received += sum(d.nbytes for d in rhead.tensors)
        else:
            payload = tensors_from_frames(rhead.tensors, reply[1:])
        self._count(sent, received)
        self.last_stamps = (t0, t1, t2, t3, t4, time.perf_counter_ns())
        return rhead, payload

    def _count(self, sent: int, received: int) -> None:
        st = self.stats
        st.calls += 1
        st.bytes_sent += sent
        st.bytes_received += received
        self.last_sizes = (sent, received)

    def _shm_reply(self, rhead, request_end: int, nframes: int) -> list[torch.Tensor]:
        """Views of the reply's tensors, which the server placed after our request."""
        start = -(-request_end // ALIGN) * ALIGN
        offsets, end = shm_offsets(rhead.tensors, start)
        if self.shm is None or not request_end or nframes != 1 or end > self.shm.size:
            raise ProtocolError(ErrorCode.BAD_SHM, f"server put a reply of {end - start} bytes in the shared "
                                "region where none was expected or it does not fit")
        return [self.shm.tensor(off, d.dtype, d.shape) for d, off in zip(rhead.tensors, offsets)]

    def _wait_reply(self, rid: int | None, op: int) -> tuple[list, int]:
        """The matching reply and the perf_counter_ns at which it was ready to read."""
        deadline = time.monotonic() + self.timeout_ms / 1000
        while True:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0 or not self._socket.poll(remaining_ms, zmq.POLLIN):
                self._close_socket()  # the region stays: the next call attaches a fresh one
                self._open()
                hint = ("; with CURVE: is this client's public key in the server's allow list, and is the "
                        "pinned server key the server's?") if self.curve is not None else ""
                raise ServerUnavailable(
                    f"no reply from {self.endpoint.url} to op {op} within {self.timeout_ms} ms "
                    f"(server gone or stalled{hint})"
                )
            ready_ns = time.perf_counter_ns()
            reply = self._socket.recv_multipart(copy=False)
            if rid is None or decode_header(reply[0].buffer).request_id == rid:
                return reply, ready_ns
            # a late reply to an abandoned request: drop it and keep waiting
