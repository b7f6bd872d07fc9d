"""The server socket: a ROUTER that never lets a malformed message escape as a crash."""
from __future__ import annotations

import time

import zmq

from teegpu.protocol import encode_header, peek_ids
from teegpu.transport.curve import ServerCurve
from teegpu.transport.endpoint import parse_endpoint


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

    def recv(self, timeout_ms: int, spin_us: int = 0) -> list | None:
        """One request as [identity, header, *frames], or None after timeout_ms.

        With spin_us, first poll without sleeping for that long: a blocked thread's
        wake-up costs more than the gap between the requests of one decode step.
        """
        if spin_us:
            deadline = time.perf_counter_ns() + spin_us * 1000
            while time.perf_counter_ns() < deadline:
                try:
                    return self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    pass
        if not self.socket.poll(timeout_ms, zmq.POLLIN):
            return None
        return self.socket.recv_multipart(copy=False)

    def reply(self, identity, header: bytes, frames) -> None:
        self.socket.send_multipart([identity, header, *frames], copy=False)

    def reply_error(self, identity, raw_header, code: int, message: str) -> None:
        """Answer with an error code and a message, echoing the request id when readable."""
        rid, op, layer = peek_ids(raw_header.buffer if hasattr(raw_header, "buffer") else raw_header)
        header = encode_header(op, rid, layer, (), status=code)
        self.socket.send_multipart([identity, header, message.encode("utf-8")])

    def close(self) -> None:
        self.socket.close(linger=0)
        if self._auth is not None:
            self._auth.stop()

