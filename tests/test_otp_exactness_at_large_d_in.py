"""otp for every d_in a LLaMA uses: the ring products stay exact and verification keeps its
2^-40 bound on the down_proj shapes of Llama-3.2-1B (d_in 8192) and Llama-3-8B (14336), and
at the new limit of 2^16."""
import pytest
import torch

from teegpu.errors import ConfigError, IntegrityError
from teegpu.protocol import Op
from teegpu.ring import (
    ACT_MAX, MAX_D_IN, WEIGHT_MAX, RingWeight, check_vectors, quantize_weights, result_bound, ring_matmul,
)
from teegpu.tee.integrity import RingVerifier
from teegpu.tee.mask_pool import random_ring

SHAPES = {"llama-3.2-1b down_proj": (2048, 8192), "llama-3-8b down_proj": (4096, 14336)}


def as_ring(v: int) -> int:
    v %= 1 << 64
    return v - (1 << 64) if v >= 1 << 63 else v


@pytest.fixture(scope="module", params=list(SHAPES))
def weight(request):
    d_out, d_in = SHAPES[request.param]
    g = torch.Generator().manual_seed(d_in)
    q = torch.randint(-WEIGHT_MAX, WEIGHT_MAX + 1, (d_out, d_in), generator=g, dtype=torch.int64)
    q[0, :] = WEIGHT_MAX  # the extremes, so that the honest bound is reached
    q[1, :] = -WEIGHT_MAX
    return q


def test_padded_products_equal_python_integers(weight):
    x = random_ring((2, weight.shape[1]))
    x[0, :4] = torch.tensor([-(1 << 63), (1 << 63) - 1, -1, 0])
    got = ring_matmul(x, RingWeight.of(weight))
    xi = x.tolist()
    for col in (0, 1, weight.shape[0] - 1):
        qi = weight[col].tolist()
        for row in range(2):
            assert got[row, col].item() == as_ring(sum(a * b for a, b in zip(xi[row], qi)))


def test_unpadding_gives_the_exact_integer_product(weight):
    ring_w = RingWeight.of(weight)
    xq = torch.full((3, weight.shape[1]), ACT_MAX, dtype=torch.int64)  # the largest honest results
    xq[1] = -ACT_MAX
    xq[2] = torch.randint(-ACT_MAX, ACT_MAX + 1, (weight.shape[1],))
    r = random_ring(xq.shape)
    y = ring_matmul(xq + r, ring_w) - ring_matmul(r, ring_w)
    want = (xq.double() @ weight.double().t()).to(torch.int64)  # |result| < 2^46: exact in float64
    assert torch.equal(y, want)
    assert int(y.abs().max()) == weight.shape[1] * ACT_MAX * WEIGHT_MAX == result_bound(weight.shape[1])


@pytest.mark.parametrize("lie", ["plus_one", "top_bit", "bit_46"])
def test_verification_catches_lies_at_large_d_in(weight, lie):
    verifier = RingVerifier({(Op.DOWN, 0): tuple(weight.shape)})
    for start in range(0, weight.shape[0], 1000):  # by blocks of rows, as weights are loaded
        verifier.add_rows((Op.DOWN, 0), start, weight[start:start + 1000])
    assert verifier.s[Op.DOWN, 0].shape[1] == check_vectors(weight.shape[1]) == 2
    ring_w = RingWeight.of(weight)
    xq = torch.randint(-ACT_MAX, ACT_MAX + 1, (2, weight.shape[1]))
    r = random_ring(xq.shape)
    padded = xq + r
    returned = ring_matmul(padded, ring_w)
    rw = ring_matmul(r, ring_w)
    verifier.check(Op.DOWN, 0, xq, returned - rw)  # honest: passes
    bad = returned.clone()
    bad[1, 7] += {"plus_one": 1, "top_bit": -(1 << 63), "bit_46": 1 << 46}[lie]
    with pytest.raises(IntegrityError):
        verifier.check(Op.DOWN, 0, xq, bad - rw)


def test_limits():
    assert MAX_D_IN == 1 << 16 and check_vectors(1 << 15) == 3 and check_vectors(1536) == 2
    with pytest.raises(ConfigError, match="ring budget"):
        quantize_weights(torch.zeros(2, MAX_D_IN + 1))
