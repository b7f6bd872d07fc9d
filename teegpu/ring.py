"""Exact integer arithmetic in Z/2^64 for the one-time-pad mode, shared by both sides.

Weights become 16-bit integers once (per-output-channel scale), activations 16-bit
per row (per-row scale). The true product of one row is then bounded by
d_in * 32767 * 32639 < 2^46 (d_in <= 2^16: every LLaMA, Llama-3-8B's down_proj has 14336),
far inside the ring: it never wraps,
so subtracting the pad's product gives it back exactly. The ring is int64's natural
two's-complement wrap-around.

Products of padded rows (uniform over all of Z/2^64) are computed exactly with int8
GEMMs (`torch._int_mm`, int32 accumulation; VNNI/AMX on CPU, tensor cores on cuda):
each int64 is cut into 8 bytes, each shifted to a signed digit (b - 128), and each
weight into two signed 8-bit halves (w = 256 hi + lo). A digit times a half summed
over d_in stays below 128 * 127 * 2^16 < 2^31, so int32 never overflows; the 16
partial products are recombined mod 2^64 and the shift by 128 is undone with a
precomputed per-column constant. docs/security.md has the bit budget.
"""
from __future__ import annotations

import hashlib

import torch

from teegpu.errors import ConfigError

WEIGHT_MAX = 127 * 256 + 127  # 16-bit weights whose two signed 8-bit halves fit int8
ACT_MAX = (1 << 15) - 1  # 16-bit activations, symmetric
MAX_D_IN = 1 << 16  # of a weight: keeps honest results below 2^46 (and int32 accumulation exact)
MAX_INNER = 1 << 16  # of any ring product: keeps int32 accumulation exact
_BYTE_SUM = int.from_bytes(b"\x01" * 8, "little")  # sum of 2^(8i), i < 8


def _to_int64(v: int) -> int:
    """A Python int taken mod 2^64, as the signed value int64 holds."""
    v %= 1 << 64
    return v - (1 << 64) if v >= 1 << 63 else v


# the place value of byte i of an activation times half h of a weight: 2^(8i + 8h) mod 2^64
_PLACE = torch.tensor([[_to_int64(1 << (8 * i + 8 * h)) for h in range(2)] for i in range(8)],
                      dtype=torch.int64).view(8, 1, 2, 1)


class RingWeight:
    """An integer weight (d_out, d_in) laid out for `ring_matmul`: its int8 halves, side by side."""

    def __init__(self, q: torch.Tensor):
        q = q.to(torch.int32)
        if q.shape[1] > MAX_INNER or int(q.abs().max()) > WEIGHT_MAX:
            raise ConfigError(f"ring weight of shape {list(q.shape)} exceeds the int8-limb budget")
        lo = ((q + 128) & 255) - 128
        hi = (q - lo) >> 8  # exact: q - lo is a multiple of 256
        self.d_out, self.d_in = q.shape
        self.halves = torch.cat([lo, hi]).to(torch.int8).t()  # (d_in, 2 d_out), transposed view
        # the digits are bytes - 128: add back 128 * sum_i 2^(8i) * (row sum of w), mod 2^64
        self.correction = q.sum(dim=1, dtype=torch.int64) * _to_int64(128 * _BYTE_SUM)  # int64 multiply wraps
        self.place = _PLACE

    def to(self, device) -> "RingWeight":
        self.halves = self.halves.to(device)
        self.correction = self.correction.to(device)
        self.place = _PLACE.to(device)
        return self


def quantize_weights(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(integer weights as int64, per-output-channel float32 scale) of a float32 (d_out, d_in) weight."""
    if w.shape[1] > MAX_D_IN:
        raise ConfigError(f"d_in {w.shape[1]} exceeds the ring budget of {MAX_D_IN}")
    w = w.float()
    scale = (w.abs().amax(dim=1, keepdim=True) / WEIGHT_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(w / scale).clamp_(-WEIGHT_MAX, WEIGHT_MAX)
    return q.to(torch.int64), scale.view(-1)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int64 fixed-point rows, per-row float32 scale) of float activations (T, d_in)."""
    x = x.float()
    scale = (x.abs().amax(dim=1, keepdim=True) / ACT_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.round(x / scale).clamp_(-ACT_MAX, ACT_MAX).to(torch.int64), scale


def ring_matmul(x: torch.Tensor, w: RingWeight) -> torch.Tensor:
    """x (T, d_in) int64, any values, times the weight transposed, mod 2^64: (T, d_out) int64."""
    chunk = max(1, (1 << 22) // (16 * w.d_out))  # rows per pass: int64 partials of at most 32 MB
    if x.shape[0] > chunk:
        return torch.cat([ring_matmul(x[i:i + chunk], w) for i in range(0, x.shape[0], chunk)])
    t = x.shape[0]
    # byte b of each value as the signed digit b - 128: flipping the top bit and reading it as int8
    digits = (x.contiguous().view(torch.uint8).view(t, -1, 8).permute(2, 0, 1) ^ 0x80).view(torch.int8)
    digits = digits.reshape(8 * t, -1)
    rows = digits.shape[0]
    if w.halves.is_cuda:
        digits = digits.to(w.halves.device)
        if rows <= 16:  # cuda's int8 GEMM wants more than 16 rows
            digits = torch.cat([digits, digits.new_zeros(17 - rows, digits.shape[1])])
    partial = torch._int_mm(digits, w.halves)[:rows].view(8, t, 2, w.d_out).to(torch.int64)
    return (partial * w.place).sum(dim=(0, 2)) + w.correction


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


def ring_fingerprint(quantized: dict) -> str:
    """SHA-256 over the integer weights and scales, in key order: both sides must derive the same."""
    h = hashlib.sha256(f"ring int16 max {WEIGHT_MAX}".encode())
    for key in sorted(quantized):
        q, scale = quantized[key]
        h.update(str(key).encode())
        h.update(q.to(torch.int16).numpy().tobytes())  # |q| <= WEIGHT_MAX fits int16
        h.update(scale.numpy().tobytes())
    return h.hexdigest()


def quantize_linears(weights) -> dict:
    """Every served weight of a ModelWeights, quantized: {(op, layer): (q int64, scale)}."""
    return {key: quantize_weights(w) for key, w in weights.served().items()}
