"""The ring arithmetic is exact, and unpadding gives back the plain integer product bit for bit."""
import pytest
import torch

from conftest import connect_engine
from teegpu.model.products import int8_gemm_exact
from teegpu.protocol import Op
from teegpu.ring import WEIGHT_MAX, RingWeight, quantize_rows, quantize_weights, ring_dot, ring_matmul
from teegpu.tee.mask_pool import random_ring


def as_ring(v: int) -> int:
    v %= 1 << 64
    return v - (1 << 64) if v >= 1 << 63 else v


@pytest.mark.parametrize("kernel", ["int8", "float64"])
def test_ring_matmul_and_dot_equal_python_integers(kernel, smollm2):
    """On both ring kernels, whichever this host would choose: int8 GEMMs where they are not
    exact here (an AVX2-only CPU, or under its cap) must not be chosen (test_kernel_choice...)."""
    if kernel == "int8" and not int8_gemm_exact():
        pytest.skip("this process's int8 GEMM is not exact (no VNNI): the float64 kernel runs here")
    weights, _ = smollm2
    q, _ = quantize_weights(weights.for_op(Op.DOWN, 3))  # a real (576, 1536) weight
    q[575], q[1] = WEIGHT_MAX, -WEIGHT_MAX  # the largest digit sums
    x = random_ring((3, q.shape[1]))
    x[0, :4] = torch.tensor([-(1 << 63), (1 << 63) - 1, -1, 0])  # the ring's edges
    x[2] = -1  # every byte 0xff: every digit 127 (and one 0: an odd sum)
    x[2, 7] = 0
    got = ring_matmul(x, RingWeight.of(q, kernel))
    qi, xi = q.tolist(), x.tolist()
    for row in range(3):
        for col in (0, 1, 287, 575):
            assert got[row, col].item() == as_ring(sum(a * b for a, b in zip(xi[row], qi[col])))
    s = random_ring((q.shape[1], 2))
    dot = ring_dot(x, s)
    for row in range(2):
        for k in range(2):
            assert dot[row, k].item() == as_ring(sum(a * b for a, b in zip(xi[row], s[:, k].tolist())))


@pytest.fixture(scope="module")
def otp_engine(smollm2, smollm2_servers):
    weights, tok = smollm2
    engine = connect_engine(weights, tok, smollm2_servers, "ipc", privacy="otp", verify=True, mask_pool_rows=48)
    yield engine
    engine.close()


@pytest.mark.parametrize("rows", [1, 37])  # a decode step and a prefill
def test_unpadded_results_equal_the_integer_product(otp_engine, rows):
    lin = otp_engine.linears
    for op, layer in [(Op.QKV, 0), (Op.O, 7), (Op.GATE_UP, 29), (Op.DOWN, 15), (Op.LM_HEAD, -1)]:
        d_in = otp_engine.weights.for_op(op, layer).shape[1]
        xq, _ = quantize_rows(torch.randn(rows, d_in) * 3)
        q, _ = quantize_weights(otp_engine.weights.for_op(op, layer))
        want = (xq.double() @ q.double().t()).to(torch.int64)  # |result| < 2^41: exact in float64
        got = lin.integer_linear(op, layer, xq)
        assert torch.equal(got, want), (op, layer)


def test_offload_attention_is_refused_with_otp():
    from teegpu.config import EngineConfig
    from teegpu.errors import ConfigError

    with pytest.raises(ConfigError, match="offload-attention"):
        EngineConfig(privacy="otp", offload_attention=True)


@pytest.mark.parametrize("client,server", [("otp", "plain"), ("plain", "otp")])
def test_privacy_mode_mismatch_is_refused(smollm2, smollm2_servers, client, server):
    from teegpu.errors import HandshakeError
    from teegpu.tee.engine import Engine

    weights, tok = smollm2
    with pytest.raises(HandshakeError, match=f"--privacy {client}"):
        Engine.connect(weights, tok, smollm2_servers("ipc", privacy=server), privacy=client).close()


def test_a_weight_moved_off_the_cpu_is_laid_out_for_the_int8_kernel(smollm2):
    """A GPU multiplies int8 digits whichever kernel this CPU chose: the int16 layout becomes the
    int8 halves on the way (meta stands for a GPU here: same path, no memory)."""
    weights, _ = smollm2
    q, _ = quantize_weights(weights.for_op(Op.O, 2))
    wide, halves = RingWeight.of(q, "float64"), RingWeight.of(q, "int8")
    moved = wide.to("meta")
    assert moved.kernel == "int8" and moved.rows.shape == halves.rows.shape and moved.rows.is_meta
    assert torch.equal(RingWeight.of(q, "float64").to("cpu").rows, wide.rows)  # the CPU keeps its kernel
    relaid = RingWeight.of(wide.rows, "int8")  # what .to does before the copy
    assert torch.equal(relaid.rows, halves.rows) and torch.equal(relaid.correction, halves.correction)
