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
from teegpu.ring import check_vectors, result_bound, ring_dot
from teegpu.tee.mask_pool import random_ring

VECTORS = 2  # plain mode's Rademacher vectors per weight
# unit roundoff of the result's dtype, and of the accumulation (reduced-precision reductions allowed on GPUs)
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
MARGIN = 8.0


class RingVerifier:
    def __init__(self, shapes: dict):
        """shapes: {(op, layer): (d_out, d_in)}; the weights arrive by blocks of rows (`add_rows`)."""
        self.s, self.ws, self.bound = {}, {}, {}
        for key, (d_out, d_in) in shapes.items():
            self.s[key] = random_ring((d_out, check_vectors(d_in)))
            self.ws[key] = torch.zeros(d_in, self.s[key].shape[1], dtype=torch.int64)  # W^T s, summed by blocks
            self.bound[key] = result_bound(d_in)

    def add_rows(self, key, start: int, q: torch.Tensor) -> None:
        """Rows start.. of integer weight `key`: W^T s += q^T s[start..] (mod 2^64), in int64's own
        wrap-around (a few vectors: elementwise products beat a GEMM here)."""
        self.ws[key] += ring_dot(q.t(), self.s[key][start:start + q.shape[0]])

    def check(self, op, layer: int, xq: torch.Tensor, unpadded: torch.Tensor) -> None:
        """unpadded = returned - R W^T, with R W^T exact: an error in the reply is the same error
        here, so Y s == x_q (W^T s) is Freivalds' test of the padded product too."""
        key = (op, layer)
        self._freivalds(op, layer, unpadded, xq, "Freivalds check failed")
        bound = self.bound[key]
        if bool(((unpadded > bound) | (unpadded < -bound)).any()):  # not abs(): |-2^63| wraps in int64
            raise IntegrityError(op.name, layer, "unpadded result outside the range an honest product can have")


    def check_pads(self, op, layer: int, r: torch.Tensor, rw: torch.Tensor) -> None:
        """A pad server's R W^T against R (W^T s). R is uniform, so no range check applies here: an
        error confined to high bits can pass this one, and is caught by `check`'s range check on
        the unpadded result instead (docs/security.md)."""
        self._freivalds(op, layer, rw, r, "the pad server's products fail Freivalds' check")

    def _freivalds(self, op, layer: int, product: torch.Tensor, x: torch.Tensor, what: str) -> None:
        """product s == x (W^T s) mod 2^64, row by row."""
        key = (op, layer)
        lhs, rhs = ring_dot(product, self.s[key]), ring_dot(x, self.ws[key])
        if not torch.equal(lhs, rhs):
            rows = (lhs != rhs).any(1).nonzero().view(-1)
            raise IntegrityError(op.name, layer, f"{what} on rows {rows[:8].tolist()}")


class FloatVerifier:
    def __init__(self, weights, wire_dtype: torch.dtype):
        """weights: (op, layer), float (d_out, d_in) pairs as the server holds them (its dtype), one
        at a time: only W^T s is kept."""
        self.eps = UNIT_ROUNDOFF[wire_dtype]
        self.s, self.ws, self.frobenius = {}, {}, {}
        for key, w in weights:
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
