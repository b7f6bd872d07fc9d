"""Exact integer arithmetic in Z/2^64 for the one-time-pad mode, shared by both sides.

Weights become 16-bit integers once (per-output-channel scale), activations 16-bit
per row (per-row scale). The true product of one row is then bounded by
d_in * 32767 * 32639 < 2^46 (d_in <= 2^16: every LLaMA, Llama-3-8B's down_proj has 14336),
far inside the ring: it never wraps,
so subtracting the pad's product gives it back exactly. The ring is int64's natural
two's-complement wrap-around.

Products of padded rows (uniform over all of Z/2^64) are computed exactly, by one of two kernels
(`products.ring_kernel`, chosen by the CPU; both give the same integers):
- "int8": int8 GEMMs (`torch._int_mm`, int32 accumulation; VNNI/AMX on CPU, tensor cores on
  cuda): each int64 is cut into 8 bytes, each shifted to a signed digit (b - 128), and each
  weight into two signed 8-bit halves (w = 256 hi + lo). A digit times a half summed over d_in
  stays below 128 * 127 * 2^16 < 2^31, so int32 never overflows; the 16 partial products are
  recombined mod 2^64.
- "float64": float64 GEMMs (every CPU): each int64 cut into 4 16-bit words, each shifted to a
  signed digit (w - 32768), times the 16-bit weight itself. A digit times a weight summed over
  d_in stays below 2^15 * 2^15 * 2^16 = 2^46 < 2^53: every partial sum is exact in float64, in
  any order. A quarter of the int8 kernel's multiply-adds, in float64: used where int8 GEMMs
  are slow (ATen's own loop on an AVX2-only CPU) or inexact (oneDNN without VNNI saturates in
  int16). On a GPU the int8 kernel runs (`RingWeight.to` lays a weight out for it).
The shift of the digits is undone with a precomputed per-column constant. docs/security.md has
the bit budget.
"""
from __future__ import annotations

import functools
import hashlib
import threading
from dataclasses import dataclass
from typing import Callable

import torch

from teegpu.errors import ConfigError
from teegpu.model.products import ring_kernel
from teegpu.model.weights import column_slice

WEIGHT_MAX = 127 * 256 + 127  # 16-bit weights whose two signed 8-bit halves fit int8
ACT_MAX = (1 << 15) - 1  # 16-bit activations, symmetric
TINY = torch.finfo(torch.float32).tiny  # the least scale: an all-zero row quantizes to zeros
MAX_D_IN = 1 << 16  # of a weight: keeps honest results below 2^46 (and int32 accumulation exact)
MAX_INNER = 1 << 16  # of any ring product: keeps int32 accumulation exact
WIDE_BLOCK = 1 << 18  # float64 weight entries converted at a time by the float64 kernel (2 MB: cached)
PASS_BYTES = 1 << 23  # a ring product's digits and partial sums per pass of rows (at least one row's): kept
_BYTE_SUM = int.from_bytes(b"\x01" * 8, "little")  # sum of 2^(8i), i < 8
_WORD_SUM = int.from_bytes(b"\x01\x00" * 4, "little")  # sum of 2^(16i), i < 4


def _to_int64(v: int) -> int:
    """A Python int taken mod 2^64, as the signed value int64 holds."""
    v %= 1 << 64
    return v - (1 << 64) if v >= 1 << 63 else v


# the place value of byte i of an activation times half h of a weight: 2^(8i + 8h) mod 2^64
_PLACE = torch.tensor([[_to_int64(1 << (8 * i + 8 * h)) for h in range(2)] for i in range(8)],
                      dtype=torch.int64).view(8, 1, 2, 1)
# the place value of word i of an activation (the float64 kernel): 2^(16i) mod 2^64
_WORD_PLACE = torch.tensor([_to_int64(1 << (16 * i)) for i in range(4)], dtype=torch.int64).view(4, 1, 1)


class RingWeight:
    """An integer weight (d_out, d_in) laid out for `ring_matmul` by its kernel, 2 bytes a parameter
    and nothing else: "int8", its int8 halves side by side; "float64", itself as int16 (converted
    a block at a time as it is used). Filled a block of rows at a time (`set_rows`), so a large
    weight never exists as int64 or float all at once."""

    def __init__(self, d_out: int, d_in: int, kernel: str | None = None):
        if d_in > MAX_INNER:
            raise ConfigError(f"ring weight of shape {[d_out, d_in]} exceeds the int8-limb budget")
        self.d_out, self.d_in = d_out, d_in
        self.kernel = ring_kernel() if kernel is None else kernel
        if self.kernel == "int8":
            self.rows = torch.empty(2 * d_out, d_in, dtype=torch.int8)  # low halves, then high halves
            self.halves = self.rows.t()  # (d_in, 2 d_out): the GEMM's right operand
            self.place = _PLACE
        else:
            self.rows = torch.empty(d_out, d_in, dtype=torch.int16)
        self.correction = torch.empty(d_out, dtype=torch.int64)

    @classmethod
    def of(cls, q: torch.Tensor, kernel: str | None = None) -> "RingWeight":
        """A whole integer weight (d_out, d_in) at once."""
        w = cls(*q.shape, kernel)
        w.set_rows(0, q)
        return w

    def set_rows(self, start: int, q: torch.Tensor) -> None:
        """Rows start.. of the integer weight (|q| <= WEIGHT_MAX)."""
        if q.numel() and max(-int(q.min()), int(q.max())) > WEIGHT_MAX:
            raise ConfigError(f"ring weight entries exceed {WEIGHT_MAX}, the int8-limb budget")
        q = q.to(torch.int16)
        end = start + q.shape[0]
        if self.kernel == "int8":
            lo = q.to(torch.int8)  # the low byte, as a signed digit: q - lo is a multiple of 256
            self.rows[start:end] = lo
            self.rows[self.d_out + start:self.d_out + end] = (q - lo) >> 8
            shift = 128 * _BYTE_SUM
        else:
            self.rows[start:end] = q
            shift = 32768 * _WORD_SUM
        # the digits are shifted down (bytes - 128, words - 32768): add back shift * (row sum of w), mod 2^64;
        # the row sum is below d_in * WEIGHT_MAX < 2^31 (d_in <= MAX_INNER): exact in int32, 5x faster than int64
        self.correction[start:end] = q.sum(dim=1, dtype=torch.int32).to(torch.int64) * _to_int64(shift)  # wraps

    def to(self, device) -> "RingWeight":
        """On a GPU the int8 kernel runs (tensor cores): re-laid out for it first if needed."""
        if torch.device(device).type != "cpu" and self.kernel != "int8":
            return RingWeight.of(self.rows, "int8").to(device)
        self.rows = self.rows.to(device)
        if self.kernel == "int8":
            self.halves, self.place = self.rows.t(), _PLACE.to(device)
        self.correction = self.correction.to(device)
        return self


def quantize_weights(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(integer weights as int16, per-output-channel float32 scale) of a float32 (d_out, d_in) weight."""
    if w.shape[1] > MAX_D_IN:
        raise ConfigError(f"d_in {w.shape[1]} exceeds the ring budget of {MAX_D_IN}")
    w = w.float()
    scale = (w.abs().amax(dim=1, keepdim=True) / WEIGHT_MAX).clamp_min(TINY)
    q = torch.div(w, scale).round_().clamp_(-WEIGHT_MAX, WEIGHT_MAX)
    return q.to(torch.int16), scale.view(-1)


def quantize_rows(x: torch.Tensor, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(int64 fixed-point rows, per-row float32 scale) of float activations (T, d_in), a block of
    rows at a time (`block_rows`); the rows are written into `out` when given."""
    x = x.float()
    out = torch.empty(x.shape, dtype=torch.int64) if out is None else out
    scale = torch.empty((x.shape[0], 1), dtype=torch.float32)
    step = block_rows(x.shape[1] * 4)
    for i in range(0, x.shape[0], step):  # max |x| per row of a cached block: vector_norm(inf) is 3x slower
        block = x[i:i + step]
        s = torch.amax(block.abs(), dim=1, keepdim=True, out=scale[i:i + step]).div_(ACT_MAX).clamp_min_(TINY)
        out[i:i + step] = (block / s).round_().clamp_(-ACT_MAX, ACT_MAX)
    return out, scale


SCRATCH_BYTES = 1 << 19  # temporaries of a row-wise pass stay below glibc's mmap threshold (1 MB)


def block_rows(row_bytes: int) -> int:
    """Rows per block of a row-wise pass whose temporaries take `row_bytes` a row: small enough to
    come from the heap and be reused (a fresh mmap of a large temporary costs a page fault per 4 KB,
    which was most of the trusted side's otp cost outside the products)."""
    return max(1, SCRATCH_BYTES // row_bytes)


def ring_matmul(x: torch.Tensor, w: RingWeight, out: torch.Tensor | None = None) -> torch.Tensor:
    """x (T, d_in) int64, any values, times the weight transposed, mod 2^64: (T, d_out) int64,
    written into `out` when given (on the weight's device), a pass of rows at a time."""
    if out is None:
        out = torch.empty(x.shape[0], w.d_out, dtype=torch.int64, device=w.rows.device)
    # rows per pass: a pass's digits and partial sums take at most PASS_BYTES (one row's at least), kept by
    # the thread. A row's: int8, 8 bytes of digits a value in, 16 int32 and 16 int64 a value out;
    # float64, 4 float64 a value in and a value out
    row_bytes = 8 * w.d_in + 192 * w.d_out if w.kernel == "int8" else 32 * (w.d_in + w.d_out)
    chunk = max(1, PASS_BYTES // row_bytes)
    for i in range(0, x.shape[0], chunk):
        _ring_rows(x[i:i + chunk], w, out[i:i + chunk])
    return out


def _ring_rows(x: torch.Tensor, w: RingWeight, out: torch.Tensor) -> None:
    if w.kernel != "int8":
        return _ring_rows_wide(x, w, out)
    t, rows = x.shape[0], 8 * x.shape[0]
    # byte b of each value as the signed digit b - 128: flipping the top bit and reading it as int8
    value_bytes = x.contiguous().view(torch.uint8).view(t, -1, 8).permute(2, 0, 1)
    if w.halves.is_cuda:  # x on the GPU or on the CPU; the device's allocator keeps its own blocks
        digits = (value_bytes.to(w.halves.device) ^ 0x80).view(torch.int8).reshape(rows, w.d_in)
        if rows <= 16:  # cuda's int8 GEMM wants more than 16 rows
            digits = torch.cat([digits, digits.new_zeros(17 - rows, digits.shape[1])])
        partial = torch._int_mm(digits, w.halves)[:rows].to(torch.int64)
    else:
        digits = _scratch_buffer("int8-digits", rows * w.d_in, torch.uint8).view(8, t, w.d_in)
        digits = torch.bitwise_xor(value_bytes, 0x80, out=digits).view(torch.int8).view(rows, w.d_in)
        sums = torch._int_mm(digits, w.halves, out=_scratch_buffer("int8-sums", rows * 2 * w.d_out, torch.int32)
                             .view(rows, 2 * w.d_out))
        partial = _scratch_buffer("int8-partial", sums.numel(), torch.int64).view(sums.shape).copy_(sums)
    torch.sum(partial.view(8, t, 2, w.d_out).mul_(w.place), dim=(0, 2), out=out)
    out += w.correction


def _ring_rows_wide(x: torch.Tensor, w: RingWeight, out: torch.Tensor) -> None:
    """The float64 kernel: 16-bit word i of each value as the signed digit word - 32768, times
    the weight converted to float64 a block of its rows at a time (2 bytes a parameter held)."""
    t = x.shape[0]
    digits = _scratch_buffer("float64-digits", 4 * t * w.d_in, torch.float64).view(4, t, w.d_in)
    digits.copy_(x.contiguous().view(torch.int16).view(t, -1, 4).permute(2, 0, 1) ^ -32768)
    digits = digits.view(4 * t, w.d_in)
    step = max(1, WIDE_BLOCK // w.d_in)
    block = _scratch_buffer("float64-block", min(step, w.d_out) * w.d_in, torch.float64).view(-1, w.d_in)
    partial = _scratch_buffer("float64-partial", 4 * t * w.d_out, torch.float64).view(4 * t, w.d_out)
    for i in range(0, w.d_out, step):
        rows = block[:min(step, w.d_out - i)].copy_(w.rows[i:i + step])
        torch.mm(digits, rows.t(), out=partial[:, i:i + step])
    ints = partial.view(torch.int64).copy_(partial)  # in place: each sum read before its bits are written
    torch.sum(ints.view(4, t, w.d_out).mul_(_WORD_PLACE), dim=0, out=out)
    out += w.correction


_scratch = threading.local()


def _scratch_buffer(name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """This thread's buffer `name` of at least `numel` entries, kept for the thread's life: a fresh
    buffer of 1 MB or more is a fresh mapping (the mmap threshold is fixed at 1 MB: tensor_files),
    and its page faults took as long as the product of one row (float64 kernel: 275 against 130 ms
    a SmolLM2 pass; int8 kernel: 2300 faults for one row of the LM head). A normal tensor, not an
    inference tensor: one thread multiplies both inside inference mode (a forward) and outside it
    (an otp engine's first mask-pool fill)."""
    buf = getattr(_scratch, name, None)
    if buf is None or buf.numel() < numel:
        with torch.inference_mode(False):
            buf = torch.empty(numel, dtype=dtype)
        setattr(_scratch, name, buf)
    return buf[:numel]


def ring_dot(a: torch.Tensor, s: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """a (T, d) times s (d, k), both int64 of any value, mod 2^64: elementwise products and
    sums in int64 wrap, and are much faster than an int64 GEMM for small k."""
    out = torch.empty(a.shape[0], s.shape[1], dtype=torch.int64)
    for i in range(0, a.shape[0], chunk):
        out[i:i + chunk] = (a[i:i + chunk, :, None] * s).sum(dim=1)
    return out


def result_bound(d_in: int) -> int:
    """The largest |x_q . w_q| an honest product can have: the range check's limit."""
    return d_in * ACT_MAX * WEIGHT_MAX


def check_vectors(d_in: int, security_bits: int = 40) -> int:
    """Freivalds vectors a weight of this d_in needs so that a wrong product passes with probability
    at most 2^-security_bits: with honest results below 2^b, an error the range check cannot see
    has 2-adic valuation v <= b, and passes one uniform vector with probability 2^(v - 64)."""
    b = result_bound(d_in).bit_length()
    return -(-security_bits // (64 - b))


@dataclass
class QuantizedLinears:
    weights: dict  # (op, layer) -> RingWeight (of the rows this rank holds)
    scales: dict  # (op, layer) -> float32 per-output-channel scale (same rows)
    fingerprint: str  # over the integer weights and scales: both sides must derive the same ("" for a slice)
    row_digests: dict  # of a slice only: (op, layer) -> SHA-256 of each held row, concatenated (for rank 0)


def quantize_linears(weights, visit: Callable | None = None, keep: bool = True,
                     part: tuple[int, int] = (0, 1)) -> QuantizedLinears:
    """Every served weight of a ModelWeights, read and quantized a block of rows at a time into its
    RingWeight (not kept without `keep`: scales and fingerprint only); `visit(key, start, q_block)`
    sees each integer block (the Freivalds precomputation). With `part` (rank, ranks): only the
    rows that tensor-parallel rank holds, and no fingerprint (rank 0 makes it from every rank's
    row digests, kept for it)."""
    out, whole = QuantizedLinears({}, {}, "", {}), part[1] == 1
    key_digests = {}
    for key in sorted(weights.served_keys()):
        d_out, d_in = weights.shape(key[0])
        start, end = column_slice(d_out, *part)
        ring, scales, digests, row = RingWeight(end - start, d_in) if keep else None, [], [], 0
        h = hashlib.sha256()  # over the row digests, as they come: the whole weight's needs no list
        for block in weights.blocks(*key, rows=(start, end)):
            q, scale = quantize_weights(block)
            if ring is not None:
                ring.set_rows(row, q)
            if visit is not None:
                visit(key, row, q)
            (h.update if whole else digests.append)(row_digests(q, scale))
            scales.append(scale)
            row += q.shape[0]
        out.scales[key] = torch.cat(scales) if scales else torch.empty(0)  # a rank may hold no rows
        if whole:
            key_digests[key] = h.digest()
        else:
            out.row_digests[key] = b"".join(digests)
        if ring is not None:
            out.weights[key] = ring
    if whole:
        out.fingerprint = ring_fingerprint(key_digests)
    return out


def row_digests(q: torch.Tensor, scale: torch.Tensor) -> bytes:
    """SHA-256 of each integer row (as int16: |q| <= WEIGHT_MAX) with its scale, concatenated: a
    row's digest needs only that row, so tensor-parallel ranks hash their own slices."""
    n = q.shape[0]
    rows = torch.cat([q.to(torch.int16).view(torch.uint8).view(n, -1), scale.view(torch.uint8).view(n, 4)], dim=1)
    data, width, sha256 = memoryview(rows.numpy().tobytes()), rows.shape[1], hashlib.sha256
    return b"".join([sha256(data[i * width:(i + 1) * width]).digest() for i in range(n)])


def ring_fingerprint(key_digests: dict) -> str:
    """SHA-256 over every served weight's digest (the SHA-256 of its row digests, in row order),
    in key order: the integer weights and their scales, the same value however many ranks hold
    them."""
    h = hashlib.sha256(f"ring int16 max {WEIGHT_MAX}, row digests".encode())
    for key in sorted(key_digests):
        h.update(str(key).encode())
        h.update(key_digests[key])
    return h.hexdigest()


def ring_fingerprint_of_ranks(row_digests: list[dict]) -> str:
    """ring_fingerprint of the whole weights from each tensor-parallel rank's `row_digests`, in
    rank order (its rows follow the previous rank's): the same value as one server's."""
    return ring_fingerprint({key: hashlib.sha256(b"".join(rank[key] for rank in row_digests)).digest()
                             for key in row_digests[0]})
