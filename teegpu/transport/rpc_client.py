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

import errno
import itertools
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import zmq

from teegpu.errors import ConfigError, HandshakeError, ProtocolError, ServerError, ServerUnavailable
from teegpu.options import CONTROL_PLANES, DATA_PLANES, DEFAULT_TIMEOUT_MS
from teegpu.protocol import (
    ALIGN, ATTACHED, DATA_START, DOORBELL, FLAG_SHM, ErrorCode, Header, Hello, Op, TensorDesc, decode_header,
    encode_header, reply_offsets, shm_offsets, tensor_frame, tensors_from_frames, with_request_id,
)
from teegpu.transport.curve import ClientCurve
from teegpu.transport.doorbell import ASLEEP, AWAKE, SOCKET_EVERY, WAITING, CpuWait, nap, relax
from teegpu.transport.endpoint import Endpoint, parse_endpoint, same_host_reason
from teegpu.transport.shm_region import DEFAULT_BYTES, ShmRegion

TEXT_REPLY_OPS = (Op.HELLO, Op.ATTACH_SHM, Op.PAD_KEY)  # answered with one UTF-8 / JSON frame, not tensors
NOT_RETRIED = (Op.HELLO, Op.ATTACH_SHM, Op.RING, Op.PAD_KEY)  # part of (re)connecting, not requests to ask again
TRIES = 3  # a request's deadline is shared by up to this many tries (more when tries fail fast)
MIN_SPIN_NS, MAX_SPIN_NS = 30_000, 2_000_000  # bounds of the window a client polls for its reply
MAX_NAP_NS = 40_000_000  # requests that waited longer than half this sleep at once (on the futex, else the socket)
FUTEX_SLICE_S = 0.02  # a client asleep on the futex looks at its socket (a lost server) at least this often
NEWS_SLICE_S = 0.001  # after a wake-up that brought no news, it looks again this soon (news may be on its way)
FUTEX_MISSES = 3  # waits that ran out with the reply there: wake-ups do not reach us, sleep on the socket
FUTEX_RETRY_S = 10.0  # ...for this long, then try the futex again (late wake-ups on a loaded host recover)
NAP_STEPS = 32  # after its nap, a long request looks for its reply every this fraction of its recent wait
FUTEX_WAKE_NS = 10_000  # a wake-up through the reply word's futex: 9 us a round trip (docs/architecture.md)
MAX_PLANS = 256  # request kinds (and reply layouts) remembered per region
EVENTS, POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)  # plain ints: pyzmq's flag enums cost microseconds


@dataclass(slots=True)
class RpcStats:
    """Running totals; cheap enough to keep always."""

    calls: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    retries: int = 0  # requests sent again after a timeout or a lost server
    failovers: int = 0  # times the client moved to another server of its pool

    def as_dict(self) -> dict:
        return {"calls": self.calls, "bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received,
                "retries": self.retries, "failovers": self.failovers}


@dataclass(slots=True)
class Reply:
    """One answered request. `tensors` may be views of the shared region, valid until the next
    call: copy what you keep. `stamps`: perf_counter_ns at start, packed, sent, reply ready,
    received, unpacked. Sizes count tensor bytes whichever plane carried them."""

    header: Header
    tensors: list[torch.Tensor]
    payload: bytes  # the text frame of HELLO / ATTACH_SHM replies
    stamps: tuple[int, ...]
    sent: int
    received: int
    path: str = "socket"  # socket, shm, doorbell, doorbell-ring (woke the server), ...-slept (reply by socket)
    tries: int = 1  # 2 and more: the request was sent again on a fresh socket (maybe another server)


@dataclass(slots=True)
class _RegionPlan:
    """Where a request of one kind (op, layer, dtypes and shapes) lies in the region, and its
    header with request id 0: computed once, as a decode step sends the same few kinds again."""

    views: list  # the region's views that take the request's tensors
    head: bytes
    request_end: int
    sent: int


@dataclass(slots=True)
class _Request:
    rid: int
    frames: list
    request_end: int  # end of the request's tensors in the shared region; 0 when inline
    sent: int


class RpcClient:
    def __init__(self, endpoint: str | list[str], timeout_ms: int = DEFAULT_TIMEOUT_MS,
                 context: zmq.Context | None = None, data_plane: str = "socket", shm_bytes: int = DEFAULT_BYTES,
                 curve: ClientCurve | None = None, control_plane: str = "doorbell", poll_slowdown: float = 1.0):
        """`endpoint`: one server, or a pool (a list, or comma-separated): one is used at a time,
        the next when it stops answering; `on_connect(hello)` (set by the engine) checks each
        server the client connects to before any request is sent again. `poll_slowdown`: how much
        our polling slows a same-host server's products (products.poll_slowdown: SMT siblings)."""
        if timeout_ms <= 0:
            raise ConfigError(f"timeout_ms must be positive, got {timeout_ms}")
        if data_plane not in DATA_PLANES:
            raise ConfigError(f"data plane {data_plane!r}: choose one of {DATA_PLANES}")
        if control_plane not in CONTROL_PLANES:
            raise ConfigError(f"control plane {control_plane!r}: choose one of {CONTROL_PLANES}")
        self.want_doorbell = control_plane == "doorbell"
        self.doorbell = False  # the server polls our region's doorbell (said in its ATTACH_SHM reply)
        self.spin_ns: dict[tuple, float] = {}  # per (op, request bytes): how long to poll for a reply
        self.cpu_wait = CpuWait()  # on oversubscribed cores: no polling, sleep (on the futex, else the socket)
        self.poll_slowdown = poll_slowdown
        self.futex_misses = 0  # futex waits the server's wake-up did not end (FUTEX_MISSES: sockets only)
        self.futex_retry_at = 0.0  # time.monotonic() after which a client at FUTEX_MISSES tries the futex again
        self.futex_said = False  # that wake-ups do not reach us (said once)
        self.endpoints = [parse_endpoint(e.strip()) for e in
                          (endpoint.split(",") if isinstance(endpoint, str) else endpoint)]
        self._current = 0
        self.on_connect: Callable[[Hello], None] | None = None
        self.timeout_ms = timeout_ms
        self.shm_bytes = shm_bytes
        self.curve = curve
        self.stats = RpcStats()
        self._ctx = context or zmq.Context.instance()
        self._next_id = 1
        self._socket: zmq.Socket | None = None
        self.shm: ShmRegion | None = None
        self._plans: dict[tuple, _RegionPlan] = {}  # of self.shm; dropped with it
        self._reply_views: dict[tuple, list] = {}  # (request end, reply descriptors) -> views of self.shm
        self._attached = False
        if data_plane == "shm":
            reason = same_host_reason(self.endpoint)
            if reason is None:
                self.shm = ShmRegion.create(shm_bytes)
            else:
                self._fall_back(reason)
        self._open()

    @property
    def endpoint(self) -> Endpoint:
        """The server in use."""
        return self.endpoints[self._current]

    @property
    def data_plane(self) -> str:
        return "shm" if self.shm is not None else "socket"

    def region_rows(self, request_row_bytes: int, reply_row_bytes: int) -> int | None:
        """How many rows of a one-tensor request and its one-tensor reply fit in the shared region
        together (None without a region): larger requests go inline, through both sides' ZeroMQ
        I/O threads, a copy and a fresh buffer per message."""
        if self.shm is None:
            return None
        return max(1, (self.shm.size - DATA_START - 2 * ALIGN) // (request_row_bytes + reply_row_bytes))

    def _fall_back(self, reason: str) -> None:
        print(f"teegpu: shared-memory data plane unavailable: {reason}; using sockets", file=sys.stderr, flush=True)
        self._drop_region()

    def _drop_region(self) -> None:
        """Unmap the region (if any), and forget every view of it."""
        if self.shm is not None:
            self.shm.close()
            self.shm = None
        self._plans.clear()
        self._reply_views.clear()

    def _open(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if self.curve is not None:
            self.curve.apply(sock)
        # a lost connection (the server died) ends the wait for its reply at once, not at the deadline
        self._monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        sock.connect(self.endpoint.url)
        self._socket = sock
        self._attached = False  # the server knows regions by socket identity

    def _close_socket(self) -> None:
        if self._socket is not None:
            self._socket.disable_monitor()
            self._monitor.close(linger=0)
            self._socket.close(linger=0)
            self._socket = None

    def _socket_news(self) -> tuple[bool, bool]:
        """(a message waits on the socket, the connection was lost), without blocking."""
        return bool(self._socket.getsockopt(EVENTS) & POLLIN), bool(self._monitor.getsockopt(EVENTS) & POLLIN)

    def close(self) -> None:
        self._close_socket()
        self._drop_region()

    def __enter__(self) -> "RpcClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _attach(self, deadline: float) -> None:
        """Tell the server the name of our region, then remove the name (both keep their mapping);
        fall back to sockets if it cannot map it. After a reconnect, a fresh region."""
        self._attached = True
        if not self.shm.owner:  # named no longer: the server we reconnect to needs a new one
            size = self.shm.size
            self._drop_region()
            self.shm = ShmRegion.create(size)
        try:
            answer = self._call_once(Op.ATTACH_SHM, 0, (), None, self.shm.name.encode(), None, deadline).payload
        except ServerError as e:
            if e.code not in (ErrorCode.BAD_SHM, ErrorCode.UNKNOWN_METHOD):
                raise
            self._fall_back(f"the server cannot map it ({e})")
            return
        self.shm.unlink()
        self.doorbell = self.want_doorbell and answer == ATTACHED + DOORBELL

    def call(self, op: int, layer: int, tensors=(), *, dtype: torch.dtype | None = None,
             payload: bytes | None = None, started_ns: int | None = None, timeout_ms: int | None = None) -> Reply:
        """Send one request and wait for the reply that matches its id; raise ServerError for an
        error reply, ServerUnavailable when the deadline passes. Tensors are sent as `dtype` when
        given (the conversion is part of the copy into the message); `payload` is the one text
        frame of ATTACH_SHM; `timeout_ms` shortens the deadline of this one call (a health probe,
        which is not retried).

        The server keeps no state between requests, so a product that times out or whose server
        is lost is asked again (the zguide's Lazy Pirate): each try gets a third of the deadline,
        the socket is reopened (on the next server of the pool, if any), the server is checked
        by `on_connect`, and the same request is sent again, all within the one deadline."""
        deadline = time.monotonic() + (timeout_ms or self.timeout_ms) / 1000
        retry = timeout_ms is None and op not in NOT_RETRIED
        tries = 0
        while True:
            tries += 1
            try_deadline = min(deadline, time.monotonic() + self.timeout_ms / 1000 / TRIES) if retry else deadline
            try:
                reply = self._call_once(op, layer, tensors, dtype, payload, started_ns, try_deadline)
                reply.tries = tries
                return reply
            except ServerError as e:
                if e.code != ErrorCode.BAD_SHM or self.shm is None or not retry:
                    raise
                # the server that got this request does not know our region: a broker spreads our
                # requests over several servers. Tensors go in the messages from now on.
                self._fall_back(f"the server that answered does not know our region ({e}; a broker in between?)")
            except ServerUnavailable as e:
                if not retry or time.monotonic() >= deadline:
                    raise ServerUnavailable(f"no reply from {self.endpoint.url} to op {op} within {self.timeout_ms} "
                                            f"ms ({tries} {'try' if tries == 1 else 'tries'}; {e})") from None
                self.stats.retries += 1
                self._reconnect(deadline)

    def _reconnect(self, deadline: float) -> None:
        """A fresh socket, on the next server of the pool, that passes `on_connect`'s check; servers
        that are down or refused are skipped until one answers or the deadline passes."""
        refused = None
        while time.monotonic() < deadline:
            self._switch((self._current + 1) % len(self.endpoints))
            try:
                try_deadline = min(deadline, time.monotonic() + self.timeout_ms / 1000 / TRIES)
                hello = Hello.from_bytes(self._call_once(Op.HELLO, 0, (), None, None, None, try_deadline).payload)
                if self.on_connect is not None:
                    self.on_connect(hello)
                return
            except HandshakeError as e:
                refused = e
                print(f"teegpu: server {self.endpoint.url} refused: {e}", file=sys.stderr, flush=True)
                time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
            except ServerUnavailable:
                pass
        if refused is not None:
            raise refused

    def probe(self, timeout_ms: int) -> bool:
        """Whether a server of the pool answers HELLO within timeout_ms and passes `on_connect`,
        the one in use first; the client stays on the first that does."""
        for i in range(len(self.endpoints)):
            if i:
                self._switch((self._current + 1) % len(self.endpoints))
            try:
                hello = Hello.from_bytes(self.call(Op.HELLO, 0, timeout_ms=timeout_ms).payload)
                if self.on_connect is not None:
                    self.on_connect(hello)
                return True
            except (ServerUnavailable, ServerError, HandshakeError):
                continue
        return False

    def _switch(self, index: int) -> None:
        """Reopen the socket on endpoints[index]; its region (if any) is attached afresh."""
        if index != self._current:
            self.stats.failovers += 1
        self._current = index
        self._close_socket()
        self._open()

    def _call_once(self, op: int, layer: int, tensors, dtype, payload, started_ns, deadline: float) -> Reply:
        t0 = started_ns or time.perf_counter_ns()
        if self.shm is not None and not self._attached and op != Op.ATTACH_SHM:
            self._attach(deadline)
        request = self._pack(op, layer, tensors, dtype, payload)
        t1 = time.perf_counter_ns()
        if self.doorbell and request.request_end:
            path, frames, t2, t3 = self._ring(request, op, deadline)
        else:
            self._socket.send_multipart([b"", *request.frames], copy=False)
            t2 = time.perf_counter_ns()
            path, (frames, t3) = self.data_plane, self._receive(request.rid, op, deadline)
        t4 = time.perf_counter_ns()
        received = sum(memoryview(f).nbytes for f in frames)
        self._count(request.sent, received)
        header, out, text = self._unpack(frames, request.request_end)
        if header.flags & FLAG_SHM:  # the reply's tensors came through the region
            shm_bytes = sum(d.nbytes for d in header.tensors)
            received += shm_bytes
            self.stats.bytes_received += shm_bytes
        stamps = (t0, t1, t2, t3, t4, time.perf_counter_ns())
        return Reply(header, out, text, stamps, request.sent, received, path)

    def _ring(self, request: _Request, op: int, deadline: float) -> tuple[str, list, int, int]:
        """A request through the doorbell: post it in the region, wake the server over the socket
        only if it sleeps, then look for the reply for a window adapted to requests of this op and
        size (`_poll`), then sleep: on the futex of the reply word (`_wait`), else on the socket.
        Requests that took over MAX_NAP_NS / 2, those whose polling would cost the server more than
        a wake-up (`_polling_costs`), and every request while other processes keep the cores busy
        (`CpuWait`), sleep at once. Returns (path, reply frames, sent ns, reply ready ns)."""
        bell, path, kind = self.shm.doorbell, "doorbell", (op, request.request_end)
        window = self.spin_ns.get(kind, MIN_SPIN_NS)
        awake = window <= MAX_NAP_NS and not self._polling_costs(window) and not self.cpu_wait.contended()
        sleeper = WAITING if self._futex_usable() and bell.reply_address else ASLEEP
        bell.set_client(AWAKE if awake else sleeper)
        seq = bell.post(request.frames[0])
        if not bell.server_awake():
            self._socket.send_multipart([b"", encode_header(Op.RING, request.rid, 0)])
            path = "doorbell-ring"
        sent = time.perf_counter_ns()
        frames = self._poll(bell, seq, request.rid, window) if awake else None
        if frames is not None:
            return path, frames, sent, self._learn(kind, sent)
        if sleeper == WAITING:
            bell.set_client(WAITING)  # from now on the server wakes us when it answers
            waited = self._wait(bell, seq, request.rid, deadline)
            if waited is not None:
                self._learn(kind, sent)
                return path + "-waited", waited[0], sent, waited[1]
        bell.set_client(ASLEEP)  # from now on the server sends the reply on the socket as well
        if bell.replied(seq):
            return path, [bell.reply_header()], sent, self._learn(kind, sent)
        frames, ready = self._receive(request.rid, op, deadline)
        self._learn(kind, sent)
        return path + "-slept", frames, sent, ready

    def _polling_costs(self, window: float) -> bool:
        """Whether spinning through this window (for a reply expected in about half of it) would slow
        the server's products, on our SMT sibling, by more than a futex wake-up costs. Long requests
        nap instead of spinning (`_poll`), which takes little from a sibling."""
        return window <= MAX_SPIN_NS and (self.poll_slowdown - 1) * window / 2 > FUTEX_WAKE_NS

    def _poll(self, bell, seq: int, rid: int, window: float) -> list | None:
        """Look for the reply (and every SOCKET_EVERY looks at the socket, where errors, replies too
        large for the region and a lost connection come) for `window` ns; its frames, or None.
        A request whose products take over MAX_SPIN_NS / 2 (a large layer on a CPU server, an LM
        head, a prefill chunk) first naps through three quarters of its recent wait, then looks
        every NAP_STEPS-th of it: spinning would spend the trusted side's CPU (and a core of the
        server's threads) for nothing."""
        napping = window > MAX_SPIN_NS
        if napping:
            nap(window * 3 / 8 / 1e9)
        spin_end = time.perf_counter_ns() + (window if napping else min(window, MAX_SPIN_NS))
        for look in itertools.count():
            if bell.replied(seq):
                return [bell.reply_header()]
            if napping or look % SOCKET_EVERY == 0:  # the socket carries only rare news
                message, lost = self._socket_news()
                if message:
                    reply = self._read_socket()
                    if reply and decode_header(reply[0]).request_id == rid:
                        return reply
                if lost or time.perf_counter_ns() > spin_end:
                    return None
            if napping:
                nap(window / 2 / NAP_STEPS / 1e9)
            else:
                relax()

    def _wait(self, bell, seq: int, rid: int, deadline: float) -> tuple[list, int] | None:
        """Sleep on the futex of the reply word (WAITING) until the reply: (its frames, the time it
        was seen). The server wakes us after it writes the reply, and after it sends us anything on
        the socket (an error, a reply too large for the region); the socket is looked at after each
        wake-up and every FUTEX_SLICE_S (a lost server). A wake-up that finds no news (one meant for
        the previous reply, which we saw before it came, or news still on its way through the socket)
        sleeps again, looking at the socket within NEWS_SLICE_S. None when the connection is lost or
        the deadline passes: the caller sleeps on the socket then. A full slice that runs out with the
        reply already there means wake-ups do not reach this process (inside an enclave the futex is
        the LibOS's own): after FUTEX_MISSES, sockets only."""
        woken = False
        while True:
            if bell.replied(seq):
                return [bell.reply_header()], time.perf_counter_ns()
            message, lost = self._socket_news()
            if message:
                reply = self._read_socket()
                if reply and decode_header(reply[0]).request_id == rid:
                    return reply, time.perf_counter_ns()
                continue
            left = deadline - time.monotonic()
            if lost or left <= 0 or self.futex_misses >= FUTEX_MISSES:
                return None
            slice_s = NEWS_SLICE_S if woken else FUTEX_SLICE_S
            error = bell.wait_reply(seq, min(slice_s, left))
            woken = error == 0
            if woken and bell.replied(seq):
                self.futex_misses = 0
            elif error == errno.ETIMEDOUT and slice_s == FUTEX_SLICE_S and bell.replied(seq):  # no wake-up came
                self._futex_missed(error, self.futex_misses + 1)
            elif error not in (0, errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT):  # no shared futexes here
                self._futex_missed(error, FUTEX_MISSES)

    def _futex_usable(self) -> bool:
        """Whether to sleep on the reply word's futex: not after FUTEX_MISSES missed wake-ups, until
        FUTEX_RETRY_S later, when one more miss sends us back to the socket. Inside an enclave, where
        wake-ups never come, a retry costs one FUTEX_SLICE_S; on a host so loaded that the server's
        wake-ups came late, the futex comes back."""
        if self.futex_misses >= FUTEX_MISSES and time.monotonic() >= self.futex_retry_at:
            self.futex_misses = FUTEX_MISSES - 1
        return self.futex_misses < FUTEX_MISSES

    def _futex_missed(self, error: int, misses: int) -> None:
        """Futex waits that went wrong, now `misses`; at FUTEX_MISSES, sockets for FUTEX_RETRY_S (said once)."""
        self.futex_misses = misses
        if misses >= FUTEX_MISSES:
            self.futex_retry_at = time.monotonic() + FUTEX_RETRY_S
            if not self.futex_said:
                self.futex_said = True
                print(f"teegpu: the server's futex wake-ups do not reach this process ({os.strerror(error)}); "
                      "sleeping on the socket instead", file=sys.stderr, flush=True)

    def _learn(self, kind: tuple, sent_ns: int) -> int:
        """Adapt the polling window of requests of this kind to twice their recent wait; the time now."""
        now = time.perf_counter_ns()
        old = self.spin_ns.get(kind, MIN_SPIN_NS)
        self.spin_ns[kind] = max(MIN_SPIN_NS, old + (2 * (now - sent_ns) - old) / 4)
        return now

    def _pack(self, op: int, layer: int, tensors, dtype: torch.dtype | None, payload: bytes | None) -> _Request:
        """The request's frames: its tensors go into the shared region when it has room, else inline."""
        rid = self._next_id
        self._next_id += 1
        if self.shm is not None and tensors and payload is None:
            key = (op, layer, dtype, *[(t.dtype, t.shape) for t in tensors])
            plan = self._plans.get(key) or self._plan(key, op, layer, tensors, dtype)
            if plan is not None:
                for view, t in zip(plan.views, tensors):
                    view.copy_(t)
                return _Request(rid, [with_request_id(plan.head, rid)], plan.request_end, plan.sent)
        # inline: no region, or the request does not fit in it
        head = encode_header(op, rid, layer, [TensorDesc(dtype or t.dtype, tuple(t.shape)) for t in tensors])
        if payload is not None:
            body = [payload]
        else:
            body = [tensor_frame(t.to(dtype) if dtype is not None else t) for t in tensors]
        return _Request(rid, [head, *body], 0, len(head) + sum(memoryview(b).nbytes for b in body))

    def _plan(self, key: tuple, op: int, layer: int, tensors, dtype) -> _RegionPlan | None:
        """The region plan of a request of this kind (None when it does not fit: it goes inline)."""
        descs = [TensorDesc(dtype or t.dtype, tuple(t.shape)) for t in tensors]
        offsets, end = shm_offsets(descs)
        if end > self.shm.size:
            return None
        if len(self._plans) >= MAX_PLANS:
            self._plans.clear()
        head = encode_header(op, 0, layer, descs, flags=FLAG_SHM)
        views = [self.shm.tensor(off, d.dtype, d.shape) for d, off in zip(descs, offsets)]
        plan = self._plans[key] = _RegionPlan(views, head, end, len(head) + sum(d.nbytes for d in descs))
        return plan

    def _unpack(self, frames: list, request_end: int) -> tuple[Header, list, bytes]:
        """(header, tensors, text payload) of a reply; raise ServerError for an error reply."""
        head = decode_header(frames[0])
        if head.status != ErrorCode.OK:
            message = bytes(frames[1]).decode("utf-8", "replace") if len(frames) > 1 else ""
            raise ServerError(head.status, message)
        if head.op in TEXT_REPLY_OPS:
            return head, [], bytes(frames[1]) if len(frames) > 1 else b""
        if head.flags & FLAG_SHM:
            return head, self._shm_reply(head, request_end, len(frames)), b""
        return head, tensors_from_frames(head.tensors, frames[1:]), b""

    def _count(self, sent: int, received: int) -> None:
        st = self.stats
        st.calls += 1
        st.bytes_sent += sent
        st.bytes_received += received

    def _shm_reply(self, rhead: Header, request_end: int, nframes: int) -> list[torch.Tensor]:
        """Views of the reply's tensors, which the server placed after our request."""
        views = self._reply_views.get((request_end, rhead.tensors))
        if views is not None and nframes == 1:
            return views
        offsets, end = reply_offsets(request_end, rhead.tensors)
        if self.shm is None or not request_end or nframes != 1 or end > self.shm.size:
            raise ProtocolError(ErrorCode.BAD_SHM, f"server put a reply of {end - offsets[0]} bytes in the "
                                "shared region where none was expected or it does not fit")
        if len(self._reply_views) >= MAX_PLANS:
            self._reply_views.clear()
        views = self._reply_views[request_end, rhead.tensors] = [
            self.shm.tensor(off, d.dtype, d.shape) for d, off in zip(rhead.tensors, offsets)]
        return views

    def _receive(self, rid: int, op: int, deadline: float) -> tuple[list, int]:
        """The reply to request `rid` (its frames' buffers) and the perf_counter_ns at which it was
        ready to read; late replies to abandoned requests are dropped."""
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        while True:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            ready = dict(poller.poll(remaining_ms)) if remaining_ms > 0 else {}
            if self._socket not in ready:
                lost = self._monitor in ready
                self._close_socket()  # the region stays: the next call attaches a fresh one
                self._open()
                hint = ("; with CURVE: is this client's public key in the server's allow list, and is the "
                        "pinned server key the server's?") if self.curve is not None else ""
                raise ServerUnavailable(f"{'connection lost: server gone' if lost else 'server gone or stalled'}{hint}")
            ready_ns = time.perf_counter_ns()
            reply = self._read_socket()
            if reply and decode_header(reply[0]).request_id == rid:
                return reply, ready_ns

    def _read_socket(self) -> list:
        """One message's frames after the envelope's empty delimiter (a broker may have added none
        of its own: the DEALER's replies start at the delimiter)."""
        frames = [f.buffer for f in self._socket.recv_multipart(copy=False)]
        return frames[1:] if frames and frames[0].nbytes == 0 else frames
