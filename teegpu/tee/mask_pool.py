"""One-time pads and their products, made ahead of need.

For each weight (op, layer) the pool holds rows of pads R, uniform over Z/2^64, and their
products R*W^T mod 2^64. A request of T rows takes T fresh rows; a row is never handed out
twice. Where they come from is the pool's source:

- LocalPads: R from os.urandom, R*W^T computed here (the trusted side pays every product).
- ServerPads: R expanded from a key shared with a pad server (pads.py), R*W^T computed by that
  second, non-colluding server; here only the expansion, the subtraction and the checks.

A background thread (at the lowest scheduling priority) keeps every key topped up to `rows`
rows. A request that finds too few makes the rest online: locally, a stall; from a pad server,
one request per block of rows, sent at once together with the same rows for the next
AHEAD_WEIGHTS weights of the forward pass, so that the pad server computes them while the main
server computes the products.
"""
from __future__ import annotations

import os
import queue
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm import tqdm

from teegpu.errors import ConfigError, HandshakeError, ServerError, ServerUnavailable
from teegpu.options import DEFAULT_MASK_POOL_ROWS
from teegpu.pads import KEY_BYTES, expand_pads, pad_words
from teegpu.protocol import PAD_KEY_FRAME, ErrorCode, Op
from teegpu.ring import block_rows, ring_matmul

STALL_CHUNK_ROWS = 64  # pads' products computed online, this many rows at a time
PAD_BLOCK_ROWS = 256  # rows of one pad-server request: a long prefill's pads arrive block by block
PAD_RETRY_S = 10.0  # after every pad server failed, how long before they are tried again
PROBE_MS = 2_000  # a down pad server's health probe
ONLINE, AHEAD, BACKGROUND = 0, 1, 2  # pad-server request priorities
AHEAD_WEIGHTS = 4  # a prefill asks for the pads of this many later weights (a layer) with its own

RANDOM_CHUNK_BYTES = 1 << 20


def random_ring(shape: tuple[int, ...]) -> torch.Tensor:
    """Uniform int64 (every value of Z/2^64 equally likely) from the OS's CSPRNG."""
    return fill_random(torch.empty(shape, dtype=torch.int64))


def fill_random(out: torch.Tensor) -> torch.Tensor:
    """Overwrite a contiguous int64 tensor with random_ring's values, a megabyte at a time (no
    second copy of a large request)."""
    flat = out.view(-1).view(torch.uint8)
    for i in range(0, flat.numel(), RANDOM_CHUNK_BYTES):
        chunk = flat[i:i + RANDOM_CHUNK_BYTES]
        chunk.copy_(torch.frombuffer(bytearray(os.urandom(chunk.numel())), dtype=torch.uint8))
    return out


@dataclass
class PoolStats:
    pads: str = "local"  # where the products come from now: local, server, or local-fallback
    rows_filled: int = 0  # rows made, counted per key
    fill_ms: float = 0.0  # local: time spent computing them (background and stalls)
    rows_used: int = 0
    stalls: int = 0  # online requests that found too few rows
    stall_rows: int = 0
    stall_ms: float = 0.0  # local: products computed online; server: waiting for pad replies
    pad_requests: int = 0  # pad-server requests answered
    server_rows: int = 0  # rows whose products a pad server computed
    pad_failovers: int = 0  # pad-server requests that moved to another server of the pool
    pad_outages: int = 0  # times every pad server was found down
    fallback_rows: int = 0  # rows whose products were computed here because every pad server was down

    def as_dict(self) -> dict:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in self.__dict__.items()}


class Recycler:
    """Freed pad-sized buffers, kept by size for the next request of that size. A fresh large
    tensor is a fresh mapping, and its first write costs a page fault per 4 KB: at the 1B shape
    that was most of an otp prefill's CPU time outside the products. At most KEEP per size."""

    KEEP = 4

    def __init__(self):
        self._free: dict[int, list] = {}
        self._lock = threading.Lock()

    def get(self, numel: int) -> torch.Tensor:
        """A flat int64 tensor of numel words (contents undefined)."""
        with self._lock:
            free = self._free.get(numel)
            if free:
                return free.pop()
        return torch.empty(numel, dtype=torch.int64)

    def put(self, t: torch.Tensor | None) -> None:
        if t is None:
            return
        with self._lock:
            free = self._free.setdefault(t.numel(), [])
            if len(free) < self.KEEP:
                free.append(t.view(-1))


class PadBatch:
    """Rows of pads for one weight and their products: `rw` once `ready` is set (None: computed
    by `unpad` from R, a local stall), or `error`. `owned`: rw and R's buffer are ours to recycle
    once every row has been used."""

    def __init__(self, key, rows: int, r: torch.Tensor | None = None, rw: torch.Tensor | None = None,
                 nonce: int = 0, expand: Callable | None = None):
        self.key, self.rows, self.nonce = key, rows, nonce
        self.rw, self.error, self.owned, self.buffer, self.used = rw, None, False, None, 0
        self._r, self._expand, self._lock = r, expand, threading.Lock()
        self.ready = threading.Event()
        if expand is None:
            self.ready.set()

    def pads(self) -> torch.Tensor:
        """R, expanded on first use (by whichever thread needs it first)."""
        with self._lock:
            if self._r is None:
                self._r = self._expand(self)
            return self._r

    def finish(self, rw: torch.Tensor | None = None, error: BaseException | None = None, owned: bool = False) -> None:
        self.rw, self.error, self.owned = rw, error, owned
        self.ready.set()


@dataclass
class Taken:
    """Rows handed to one request: each part's R, and where its products lie."""

    rs: list  # R of each part
    parts: list  # (batch, first row in the batch, rows)

    def add_to(self, xq: torch.Tensor) -> torch.Tensor:
        """xq += R in place (wrapping mod 2^64), part by part: no concatenated copy of R."""
        at = 0
        for r in self.rs:
            xq[at:at + r.shape[0]].add_(r)
            at += r.shape[0]
        return xq

    def rows(self, start: int, stop: int) -> "Taken":
        """The rows start..stop of these (a request sent in pieces)."""
        rs, parts, at = [], [], 0
        for r, (batch, lo, n) in zip(self.rs, self.parts):
            a, b = max(start, at), min(stop, at + n)
            if a < b:
                rs.append(r[a - at:b - at])
                parts.append((batch, lo + a - at, b - a))
            at += n
        return Taken(rs, parts)

    def subtract_from(self, padded: torch.Tensor) -> torch.Tensor:
        """padded - R, as a new tensor."""
        out, at = torch.empty_like(padded), 0
        for r in self.rs:
            torch.sub(padded[at:at + r.shape[0]], r, out=out[at:at + r.shape[0]])
            at += r.shape[0]
        return out


class LocalPads:
    """R from the OS's CSPRNG, R*W^T computed here. `weights`: {(op, layer): RingWeight}."""

    def __init__(self, weights: dict):
        self.weights = weights

    def make(self, key, rows: int, priority: int) -> PadBatch:
        r = random_ring((rows, self.weights[key].d_in))
        if priority == ONLINE:  # products computed by `unpad`, a chunk at a time, when the reply is in
            return PadBatch(key, rows, r)
        return PadBatch(key, rows, r, ring_matmul(r, self.weights[key]))

    def products(self, key, r: torch.Tensor) -> torch.Tensor:
        return ring_matmul(r, self.weights[key])

    def close(self) -> None:
        pass


class ServerPads:
    """R expanded from a fresh 128-bit key that the pad server holds too; R*W^T from the pad
    server, requested by one worker thread (which owns the pad client) in priority order.

    `fallback` builds a LocalPads when every pad server is down (--pads server-or-local); without
    it such a batch fails with ServerUnavailable. The fallback is said on stderr and in stats."""

    def __init__(self, client, shapes: dict, stats: PoolStats, fallback: Callable[[], LocalPads] | None = None,
                 recycler: Recycler | None = None):
        self.client, self.shapes, self.stats = client, shapes, stats
        self.recycler = recycler or Recycler()
        self.key = os.urandom(KEY_BYTES)
        self.key_id = int.from_bytes(os.urandom(8), "little") >> 1  # positive int64
        self.next_nonce = 1  # unique per request under this key: no pad is ever made twice
        self._fallback, self._local = fallback, None
        self._down_until = 0.0
        self._jobs: queue.PriorityQueue = queue.PriorityQueue()
        self._order = 0
        self._nonce_lock = threading.Lock()
        stats.pads = "server"
        self.register()
        self._thread = threading.Thread(target=self._work, name="pad-client", daemon=True)
        self._thread.start()

    def register(self) -> None:
        """Give the pad server our key (over CURVE when configured: docs/security.md)."""
        self.client.call(Op.PAD_KEY, 0, payload=PAD_KEY_FRAME.pack(self.key_id, self.key))

    def make(self, key, rows: int, priority: int) -> PadBatch:
        with self._nonce_lock:
            nonce, self.next_nonce = self.next_nonce, self.next_nonce + 1
            self._order += 1
            order = self._order
        batch = PadBatch(key, rows, nonce=nonce, expand=self._expand)
        self._jobs.put((priority, order, batch))
        return batch

    def _expand(self, batch: PadBatch) -> torch.Tensor:
        op, layer = batch.key
        d_in = self.shapes[batch.key][1]
        batch.buffer = self.recycler.get(pad_words(batch.rows, d_in))
        return expand_pads(self.key, batch.nonce, op, layer, batch.rows, d_in, batch.buffer)

    def _work(self) -> None:
        with torch.inference_mode():  # the recycled buffers are the forward pass's inference tensors
            self._work_until_closed()

    def _work_until_closed(self) -> None:
        while True:
            _, _, batch = self._jobs.get()
            if batch is None:
                return
            try:
                rw, owned = self._products(batch)
                batch.finish(rw, owned=owned)
            except BaseException as e:  # noqa: BLE001 -- handed to the request that takes these rows
                batch.finish(error=e)

    def _products(self, batch: PadBatch) -> tuple[torch.Tensor, bool]:
        """(R*W^T of one batch, whether its buffer is ours to recycle): from the pad server
        pool, or here when all are down and that is allowed."""
        now = time.monotonic()
        if now >= self._down_until and (not self._down_until or self.client.probe(PROBE_MS)):
            try:
                products = self._request(batch)
                self.stats.pads = "server"
                return products
            except ServerUnavailable as e:
                self._down_until = time.monotonic() + PAD_RETRY_S
                self.stats.pad_outages += 1
                if self._fallback is None:
                    raise
                print(f"teegpu: every pad server is down ({e}); computing pads locally (--pads server-or-local), "
                      f"trying the pad servers again every {PAD_RETRY_S:.0f} s", file=sys.stderr, flush=True)
        elif self._down_until and now >= self._down_until:
            self._down_until = now + PAD_RETRY_S  # the probe failed: still down
        if self._fallback is None:
            raise ServerUnavailable(f"every pad server was down within the last {PAD_RETRY_S:.0f} s "
                                    "(--pads server: no local fallback)")
        if self._local is None:
            self._local = self._fallback()
        self.stats.pads, self.stats.fallback_rows = "local-fallback", self.stats.fallback_rows + batch.rows
        return self._local.products(batch.key, batch.pads()), False

    def _request(self, batch: PadBatch) -> tuple[torch.Tensor, bool]:
        op, layer = batch.key
        fields = torch.tensor([self.key_id, batch.nonce, int(op), batch.rows], dtype=torch.int64)
        failovers = self.client.stats.failovers
        try:
            reply = self.client.call(Op.PADS, layer, (fields,))
        except ServerError as e:
            if e.code != ErrorCode.UNKNOWN_KEY:  # else: the server restarted, or we failed over
                raise
            self.register()
            reply = self.client.call(Op.PADS, layer, (fields,))
        self.stats.pad_requests += 1
        self.stats.server_rows += batch.rows
        self.stats.pad_failovers += self.client.stats.failovers - failovers
        (rw,) = reply.tensors
        want = (batch.rows, self.shapes[batch.key][0])
        if rw.dtype != torch.int64 or tuple(rw.shape) != want:
            raise HandshakeError(f"pad server replied {rw.dtype} {list(rw.shape)} to a request for int64 {list(want)}")
        if self.client.shm is None or not self.client.shm.holds(rw):
            return rw, False  # a message of its own: ours as it is
        return self.recycler.get(rw.numel()).view(rw.shape).copy_(rw), True

    def close(self) -> None:
        self._jobs.put((-1, 0, None))
        self._thread.join(timeout=30)
        self.client.close()


class MaskPool:
    def __init__(self, shapes: dict, source, rows: int = DEFAULT_MASK_POOL_ROWS, background: bool = True,
                 progress: bool = True, stats: PoolStats | None = None):
        """shapes: {(op, layer): (d_out, d_in)}; source: LocalPads or ServerPads; rows kept ready per
        key, refilled in one batch once a key falls to half (batches are cheaper, and a pool sized
        for a whole generation is not refilled during it)."""
        if rows < 1:
            raise ConfigError(f"mask pool rows must be at least 1, got {rows}")
        self.shapes, self.source, self.rows = shapes, source, rows
        self.stats = stats or PoolStats()
        self.server = isinstance(source, ServerPads)
        self._queue: dict = {key: deque() for key in shapes}  # [batch, next row] not yet handed out
        self._have: dict = {key: 0 for key in shapes}  # rows in the queue (ready or on their way)
        # the forward pass's order of weights (the LM head's rows are the logit rows: not ahead)
        self._order = sorted((k for k in shapes if k[1] >= 0), key=lambda k: (k[1], k[0]))
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stop = False
        self._fill_all(progress)
        self._thread = None
        if background:
            self._thread = threading.Thread(target=self._refill_loop, name="mask-pool", daemon=True)
            self._thread.start()

    def _make(self, key, rows: int, priority: int) -> None:
        """Make `rows` more rows for key (outside the lock) and queue them, in blocks."""
        block = PAD_BLOCK_ROWS if self.server else rows
        for start in range(0, rows, block):
            n = min(block, rows - start)
            t0 = time.perf_counter()
            batch = self.source.make(key, n, priority)
            with self._lock:
                if not self.server:
                    self.stats.fill_ms += (time.perf_counter() - t0) * 1000
                self.stats.rows_filled += n
                self._queue[key].append([batch, 0])
                self._have[key] += n

    def refill(self) -> None:
        """Top every key up to `rows` now (benchmarks: outside the timed part)."""
        for key in self.shapes:
            with self._lock:
                need = self.rows - self._have[key]
            if need > 0:
                self._make(key, need, BACKGROUND)
        self.wait_ready()

    def wait_ready(self) -> None:
        """Until every queued batch has its products (benchmarks)."""
        with self._lock:
            batches = [b for q in self._queue.values() for b, _ in q]
        for b in batches:
            b.ready.wait()

    def _fill_all(self, progress: bool) -> None:
        """The first fill, with one progress bar on a terminal (local pads: seconds per 100 weights)."""
        bar = tqdm(self.shapes, desc=f"mask pool ({self.rows} rows)", unit="weight", file=sys.stderr,
                   leave=False, disable=not (progress and sys.stderr.isatty()))
        for key in bar:
            self._make(key, self.rows, BACKGROUND)

    def take(self, key, n: int) -> Taken:
        """n fresh pad rows for this weight, removed from the pool, and where their products lie.
        Too few: the rest are made online (from a pad server: and the same rows for the next
        AHEAD_WEIGHTS weights of the forward pass that have too few, ahead of their requests)."""
        parts = self._pop(key, n)
        missing = n - sum(rows for _, _, rows in parts)
        if missing:
            with self._lock:
                self.stats.stalls, self.stats.stall_rows = self.stats.stalls + 1, self.stats.stall_rows + missing
            self._make(key, missing, ONLINE)
            parts += self._pop(key, missing)
            if self.server:
                self._ahead(key, n)
        with self._lock:
            self.stats.rows_used += n
            if self._have[key] <= self.rows // 2:  # the refill thread's own test: wake it only to refill
                self._wake.notify()
        return Taken([b.pads()[lo:lo + rows] for b, lo, rows in parts], parts)

    def _pop(self, key, n: int) -> list:
        parts = []
        with self._lock:
            q = self._queue[key]
            while n and q:
                batch, lo = q[0]
                rows = min(n, batch.rows - lo)
                parts.append((batch, lo, rows))
                n -= rows
                self._have[key] -= rows
                if lo + rows == batch.rows:
                    q.popleft()
                else:
                    q[0][1] = lo + rows
        return parts

    def _ahead(self, key, n: int) -> None:
        """Ask the pad server now for what the next AHEAD_WEIGHTS weights of this forward pass will
        take (a window, so that a long prefill's products do not all wait in memory at once)."""
        if key not in self._order:
            return
        at = self._order.index(key)
        for later in self._order[at + 1:at + 1 + AHEAD_WEIGHTS]:
            with self._lock:
                need = n - self._have[later]
            if need > 0:
                self._make(later, need, AHEAD)

    def unpad(self, key, z: torch.Tensor, taken: Taken, check: Callable | None = None,
              out: torch.Tensor | None = None, emit: Callable | None = None) -> torch.Tensor | None:
        """z - R W^T, as a new tensor (or in the flat buffer `out`): each element of z (which may lie
        in the shared region, where the server can write at any time) is read exactly once. Part by
        part, waiting for products still on their way; `check(r, rw)` sees each part's pads and
        products first (--verify: Freivalds on the pad server's reply). Local stall rows are computed
        here, a chunk at a time, so that a long prefill never holds all its pads' products at once.
        With `emit(row, y_rows)` the product is handed over a cache-sized block of rows at a time
        instead (and None returned): its consumer reads it while it is still in cache."""
        y = None if emit is not None else torch.empty_like(z) if out is None else out.view(z.shape)
        at = 0
        for (batch, lo, rows), r in zip(taken.parts, taken.rs):
            self._wait(batch)
            if batch.rw is None:  # made here: the stall path
                part = z[at:at + rows].clone() if y is None else y[at:at + rows].copy_(z[at:at + rows])
                self._products_online(key, part, r)
                if emit is not None:
                    emit(at, part)
            elif emit is None:
                if check is not None:
                    check(r, batch.rw[lo:lo + rows])
                torch.sub(z[at:at + rows], batch.rw[lo:lo + rows], out=y[at:at + rows])
            else:
                self._emit_difference(z[at:at + rows], batch.rw[lo:lo + rows], at, emit)
            at += rows
        return y

    def _wait(self, batch: PadBatch) -> None:
        if not batch.ready.is_set():
            t0 = time.perf_counter()
            batch.ready.wait()
            with self._lock:
                self.stats.stall_ms += (time.perf_counter() - t0) * 1000
        if batch.error is not None:
            raise batch.error

    @staticmethod
    def _emit_difference(z: torch.Tensor, rw: torch.Tensor, at: int, emit: Callable) -> None:
        step = block_rows(z.shape[1] * 8)
        scratch = torch.empty((min(step, z.shape[0]), z.shape[1]), dtype=torch.int64)
        for i in range(0, z.shape[0], step):
            n = min(step, z.shape[0] - i)
            emit(at + i, torch.sub(z[i:i + n], rw[i:i + n], out=scratch[:n]))

    def release(self, taken: Taken) -> None:
        """The request is done with these rows: a batch whose every row is done gives its buffers
        back for reuse (pad-server batches; local ones are freed as usual)."""
        recycler = getattr(self.source, "recycler", None)
        for batch, _, rows in taken.parts:
            with self._lock:
                batch.used += rows
                done = batch.used == batch.rows
            if done and recycler is not None:
                recycler.put(batch.buffer)
                if batch.owned:
                    recycler.put(batch.rw)
                batch.buffer = batch.rw = batch._r = None
        taken.rs.clear()

    def _products_online(self, key, y: torch.Tensor, r: torch.Tensor) -> None:
        t0 = time.perf_counter()
        for i in range(0, r.shape[0], STALL_CHUNK_ROWS):
            y[i:i + STALL_CHUNK_ROWS] -= self.source.products(key, r[i:i + STALL_CHUNK_ROWS])
        ms = (time.perf_counter() - t0) * 1000
        with self._lock:
            self.stats.stall_ms, self.stats.fill_ms = self.stats.stall_ms + ms, self.stats.fill_ms + ms

    def _refill_loop(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # idle time only (Linux: per thread)
        except (AttributeError, OSError):
            pass
        while True:
            with self._lock:
                while not self._stop and all(have > self.rows // 2 for have in self._have.values()):
                    self._wake.wait()
                if self._stop:
                    return
                key = min(self._have, key=self._have.get)
                need = self.rows - self._have[key]
            self._make(key, need, BACKGROUND)

    def offline_ms_per_token(self) -> float:
        """Pad precomputation per generated token: one row for every weight."""
        per_row = self.stats.fill_ms / max(self.stats.rows_filled, 1)
        return per_row * len(self.shapes)

    def close(self) -> None:
        with self._lock:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.source.close()
