"""Every x W^T of the plain modes goes through teegpu.model.products.linear (server and
TEE-only alike): large float32 products through oneDNN, the rest through torch.mm. Whichever
kernel runs, the result is the product up to float32 rounding, lands in `out` when given,
and reduced precision is exactly torch's own product."""
import pytest
import torch

from teegpu.model import products
from teegpu.model.products import ONEDNN_MACS, linear

SHAPES = [(1, 64, 64), (1, 576, 1536), (8, 3072, 576), (2, 49152, 64), (300, 576, 1536)]


@pytest.mark.parametrize("rows, d_out, d_in", SHAPES)
def test_float32_products_are_exact_up_to_rounding(rows, d_out, d_in):
    x, w = torch.randn(rows, d_in), torch.randn(d_out, d_in)
    got = linear(x, w).double()
    want = x.double() @ w.double().T
    bound = 2.0 ** -24 * d_in * (x.double().abs() @ w.double().abs().T)  # the classic dot-product bound
    assert ((got - want).abs() <= bound).all()


def test_large_products_take_onednn_and_small_ones_torch_mm():
    small, large = (torch.randn(1, 64), torch.randn(64, 64)), (torch.randn(8, 576), torch.randn(3072, 576))
    assert 8 * 3072 * 576 >= ONEDNN_MACS > 64 * 64
    assert torch.equal(linear(*small), torch.mm(small[0], small[1].t()))
    if products._ONEDNN is None:
        pytest.skip("torch built without oneDNN: every product is torch.mm")
    x, w = large
    assert torch.equal(linear(x, w), products._ONEDNN(x, w, None, "none", [], ""))


def test_the_product_lands_in_out():
    x, w = torch.randn(8, 576), torch.randn(3072, 576)
    out = torch.full((8, 3072), float("nan"))
    assert linear(x, w, out=out).data_ptr() == out.data_ptr()
    assert torch.equal(out, linear(x, w))


@pytest.mark.parametrize("rows", [1, 8, 300])
def test_bfloat16_is_torch_mm_exactly_packed_or_not(rows):
    """A packed bf16 weight (oneDNN's blocked layout, read twice as fast) gives torch.mm's bits."""
    x, w = torch.randn(rows, 576, dtype=torch.bfloat16), torch.randn(3072, 576, dtype=torch.bfloat16)
    want = torch.mm(x, w.t())
    assert torch.equal(linear(x, w), want)
    packed = products.pack(w)
    assert torch.equal(linear(x, packed), want)
    assert products.pack(torch.randn(4, 4)).is_mkldnn is False  # float32 weights stay as they are
