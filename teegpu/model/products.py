"""x W^T for whoever holds W (the server, or the TEE-only trusted side), with the faster CPU
kernel for its size.

On our CPU (AMD EPYC) torch's float32 GEMM (MKL's sgemm) runs at about half the speed of
oneDNN's for anything but a one-row product by a small weight: a 512-row prefill product 2.2x
slower, an LM head over one row 2.8x, a batched 8-row decode product 1.6x (BENCHMARKS.md).
Reduced precision already goes to oneDNN inside torch.mm, which reads the weight as given;
`pack` puts a bfloat16 weight once in oneDNN's blocked layout instead: one-row products 1.5-2.5x
faster, the same bits as torch.mm. For float32 the two kernels sum in other orders: results
differ in the last bits (float32 rounding), never more.
"""
from __future__ import annotations

import torch

ONEDNN_MACS = 1 << 22  # float32 products of at least this many multiply-adds go to oneDNN
_ONEDNN = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
_REORDER = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None) if _ONEDNN is not None else None


def pack(weight: torch.Tensor) -> torch.Tensor:
    """The weight as `linear` reads it fastest: a bfloat16 weight on the CPU in oneDNN's blocked
    layout (an opaque tensor only `linear` uses), anything else as it is."""
    if _REORDER is not None and weight.dtype == torch.bfloat16 and weight.device.type == "cpu":
        return _REORDER(weight.contiguous(), 1)
    return weight


def linear(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x (T, d_in) @ weight (d_out, d_in)^T, into `out` when given."""
    if weight.is_mkldnn or (_ONEDNN is not None and x.dtype == torch.float32 and x.device.type == "cpu"
                            and x.shape[0] * weight.shape[0] * weight.shape[1] >= ONEDNN_MACS):
        y = _ONEDNN(x.contiguous(), weight, None, "none", [], "")
        return y if out is None else out.copy_(y)
    return torch.mm(x, weight.t(), out=out)
