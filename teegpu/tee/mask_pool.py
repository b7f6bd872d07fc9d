"""One-time pads and their products, computed ahead of need.

For each weight (op, layer) the pool holds rows of pads R, uniform over Z/2^64 from
os.urandom, and their products R*W^T mod 2^64. A request of T rows takes T fresh rows;
a row is never handed out twice. A background thread (at the lowest scheduling
priority, so it takes idle time only) keeps every key topped up to `rows` rows; if the
online path finds too few, it computes the rest itself and counts a stall.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from teegpu.errors import ConfigError
from teegpu.options import DEFAULT_MASK_POOL_ROWS
from teegpu.ring import ring_matmul

STALL_CHUNK_ROWS = 64  # pads' products computed online, this many rows at a time

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
    rows_filled: int = 0  # rows computed, counted per key
    fill_ms: float = 0.0  # time spent computing them (background and stalls)
    rows_used: int = 0
    stalls: int = 0  # online requests that found too few rows
    stall_rows: int = 0
    stall_ms: float = 0.0

    def as_dict(self) -> dict:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in self.__dict__.items()}


class MaskPool:
    def __init__(self, weights: dict, rows: int = DEFAULT_MASK_POOL_ROWS, background: bool = True,
                 progress: bool = True):
        """weights: {(op, layer): RingWeight}; rows kept ready per key, refilled in one batch once
        a key falls to half (batches are cheaper, and a pool sized for a whole generation is
        not refilled during it)."""
        if rows < 1:
            raise ConfigError(f"mask pool rows must be at least 1, got {rows}")
        self.weights, self.rows = weights, rows
        self.stats = PoolStats()
        self._ready: dict = {key: (torch.empty(0, w.d_in, dtype=torch.int64),
                                   torch.empty(0, w.d_out, dtype=torch.int64)) for key, w in weights.items()}
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stop = False
        self._fill_all(progress)
        self._thread = None
        if background:
            self._thread = threading.Thread(target=self._refill_loop, name="mask-pool", daemon=True)
            self._thread.start()

    def _compute(self, key, n: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """n fresh pad rows, their products, and the milliseconds it took (counted as fill time)."""
        t0 = time.perf_counter()
        r = random_ring((n, self.weights[key].d_in))
        rw = ring_matmul(r, self.weights[key])
        ms = (time.perf_counter() - t0) * 1000
        with self._lock:
            self.stats.rows_filled += n
            self.stats.fill_ms += ms
        return r, rw, ms

    def _fill(self, key, n: int) -> None:
        """Compute n rows for key (outside the lock) and append them to its ready rows."""
        r, rw, _ = self._compute(key, n)
        with self._lock:
            old_r, old_rw = self._ready[key]
            self._ready[key] = (torch.cat([old_r, r]), torch.cat([old_rw, rw]))

    def refill(self) -> None:
        """Top every key up to `rows` now (benchmarks: outside the timed part)."""
        for key in self.weights:
            with self._lock:
                need = self.rows - self._ready[key][0].shape[0]
            if need > 0:
                self._fill(key, need)

    def _fill_all(self, progress: bool) -> None:
        """The first fill, with one progress bar on a terminal (it takes seconds per 100 weights)."""
        bar = tqdm(self.weights, desc=f"mask pool ({self.rows} rows)", unit="weight", file=sys.stderr,
                   leave=False, disable=not (progress and sys.stderr.isatty()))
        for key in bar:
            self._fill(key, self.rows)

    def take(self, key, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """n fresh pad rows for this weight, removed from the pool, and the products of the first
        rows (those that were ready; `unpad` computes the others' when the reply is in)."""
        with self._lock:
            r, rw = self._ready[key]
            have = min(n, r.shape[0])
            out_r, out_rw = r[:have], rw[:have]
            self._ready[key] = (r[have:], rw[have:])
            self.stats.rows_used += n
            self._wake.notify()
        if have < n:  # the pads themselves are cheap; their products wait for `unpad`
            t0 = time.perf_counter()
            all_r = torch.empty(n, self.weights[key].d_in, dtype=torch.int64)
            all_r[:have] = out_r
            fill_random(all_r[have:])
            out_r = all_r
            with self._lock:
                self.stats.stall_ms += (time.perf_counter() - t0) * 1000
        return out_r, out_rw

    def unpad(self, key, y: torch.Tensor, r: torch.Tensor, rw: torch.Tensor) -> None:
        """y -= R W^T in place: the ready products `rw` for the first rows, and for the rest (a
        stall: the online path pays) products computed a chunk of rows at a time, so that a long
        prefill never holds all its pads' products at once."""
        have = rw.shape[0]
        y[:have] -= rw
        if have == r.shape[0]:
            return
        t0 = time.perf_counter()
        for i in range(have, r.shape[0], STALL_CHUNK_ROWS):
            y[i:i + STALL_CHUNK_ROWS] -= ring_matmul(r[i:i + STALL_CHUNK_ROWS], self.weights[key])
        ms = (time.perf_counter() - t0) * 1000
        with self._lock:
            s, missing = self.stats, r.shape[0] - have
            s.stalls, s.stall_rows, s.stall_ms = s.stalls + 1, s.stall_rows + missing, s.stall_ms + ms
            s.rows_filled, s.fill_ms = s.rows_filled + missing, s.fill_ms + ms

    def _refill_loop(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # idle time only (Linux: per thread)
        except (AttributeError, OSError):
            pass
        while True:
            with self._lock:
                while not self._stop and all(r.shape[0] > self.rows // 2 for r, _ in self._ready.values()):
                    self._wake.wait()
                if self._stop:
                    return
                key = min(self._ready, key=lambda k: self._ready[k][0].shape[0])
                need = self.rows - self._ready[key][0].shape[0]
            self._fill(key, need)

    def offline_ms_per_token(self) -> float:
        """Pad precomputation per generated token: one row for every weight."""
        per_row = self.stats.fill_ms / max(self.stats.rows_filled, 1)
        return per_row * len(self.weights)

    def close(self) -> None:
        with self._lock:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
