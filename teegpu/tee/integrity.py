"""Checks on every product the server returns (Freivalds), before anything uses it.

Ring mode (otp): exact. Secret vectors s (uniform over Z/2^64, `check_vectors(d_in)` per weight:
2 up to d_in 16448, Llama-3-8B's 14336 included; 3 beyond)
are drawn once; W^T s is precomputed at load. For a returned Z = X_padded W^T the client
compares Z s with X_padded (W^T s) mod 2^64, row by row, and checks that every unpadded
result lies within the honest bound. docs/security.md gives the detection argument.

Plain mode (float): the same comparison in float64 with Rademacher vectors and a
tolerance from the wire dtype's rounding (see `float_tolerance`): it catches what is
larger than what an honest GEMM in that dtype can be off by.
"""
from __future__ import annotations

import math
import os

import torch

from teegpu.errors import IntegrityError
from teegpu.protocol import ATTENTION_OPS
from teegpu.ring import RingWeight, check_vectors, result_bound, ring_dot, ring_matmul
from teegpu.tee.mask_pool import random_ring

VECTORS = 2  # plain mode's Rademacher vectors per weight
# unit roundoff of the result's dtype, and of the accumulation (reduced-precision reductions allowed on GPUs)
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
MARGIN = 8.0


class RingVerifier:
    def __init__(self, weights: dict):
        """weights: {(op, layer): integer int64 (d_out, d_in)}."""
        self.s, self.ws, self.bound = {}, {}, {}
        for key, w in weights.items():
            s = random_ring((w.shape[0], check_vectors(w.shape[1])))
            self.s[key] = s
            self.ws[key] = ring_matmul(s.t(), RingWeight(w.t())).t().contiguous()  # W^T s: (d_in, VECTORS)
            self.bound[key] = result_bound(w.shape[1])

    def check(self, op, layer: int, padded: torch.Tensor, returned: torch.Tensor, unpadded: torch.Tensor) -> None:
        key = (op, layer)
        lhs, rhs = ring_dot(returned, self.s[key]), ring_dot(padded, self.ws[key])
        if not torch.equal(lhs, rhs):
            rows = (lhs != rhs).any(1).nonzero().view(-1)
            raise IntegrityError(op.name, layer, f"Freivalds check failed on rows {rows[:8].tolist()}")
        bound = self.bound[key]
        if bool(((unpadded > bound) | (unpadded < -bound)).any()):  # not abs(): |-2^63| wraps in int64
            raise IntegrityError(op.name, layer, "unpadded result outside the range an honest product can have")


class FloatVerifier:
    def __init__(self, weights: dict, wire_dtype: torch.dtype):
        """weights: {(op, layer): float (d_out, d_in)} as the server holds them (its dtype)."""
        self.eps = UNIT_ROUNDOFF[wire_dtype]
        self.s, self.ws, self.frobenius = {}, {}, {}
        for key, w in weights.items():
            w = w.to(wire_dtype).double()
            s = rademacher((w.shape[0], VECTORS))
            self.s[key], self.ws[key], self.frobenius[key] = s, w.t() @ s, float(w.norm())

    def check(self, op, layer: int, inputs: list[torch.Tensor], returned: torch.Tensor) -> None:
        if op in ATTENTION_OPS:  # a @ b with both ours: a fresh s per call
            a, b = (t.double() for t in inputs)
            s = rademacher((b.shape[2], VECTORS))
            lhs, rhs = returned.double() @ s, a @ (b @ s)
            tol = float_tolerance(self.eps, returned.double(), a, b.shape[1], b.norm(dim=(1, 2)).view(-1, 1, 1))
        else:
            key = (op, layer)
            x = inputs[0].double()
            lhs, rhs = returned.double() @ self.s[key], x @ self.ws[key]
            tol = float_tolerance(self.eps, returned.double(), x, x.shape[-1], self.frobenius[key])
        bad = ~((lhs - rhs).abs() <= tol)  # NaN and inf fail too
        if bad.any():
            worst = float(((lhs - rhs).abs() / tol).nan_to_num(float("inf")).max())
            raise IntegrityError(op.name, layer, f"Freivalds check failed ({worst:.3g}x the {returned.dtype} tolerance)")


def rademacher(shape: tuple[int, ...]) -> torch.Tensor:
    """Secret +-1 entries from the OS's CSPRNG."""
    bits = torch.frombuffer(bytearray(os.urandom(math.prod(shape))), dtype=torch.uint8) & 1
    return (bits.double() * 2 - 1).view(shape)


def float_tolerance(eps: float, z: torch.Tensor, x: torch.Tensor, d_in: int, w_norm) -> torch.Tensor:
    """Per row: rounding of the results (eps |z|_2) plus accumulation (eps sqrt(d_in) |x|_2 |W|_F),
    both as root-sum-square, since the errors of a GEMM are not all of one sign; times MARGIN."""
    z_norm = z.norm(dim=-1, keepdim=True)
    x_norm = x.norm(dim=-1, keepdim=True)
    return MARGIN * eps * (z_norm + math.sqrt(d_in) * x_norm * w_norm) + 1e-30
