"""Memory: each side holds what it needs of the model and nothing more (at the 1B shape this is
what keeps the trusted side inside an enclave; `python -m bench seed` reports the peak RSS).

The tensors an object holds are counted by walking its attributes (teegpu objects, lists,
tuples, dicts): the plain trusted side holds no linear weight; the otp trusted side and the otp
server hold each linear weight only as a ring weight (int8 halves, or int16 where the float64
ring kernel runs: 2 bytes a parameter either way); a plain server holds
each weight once, in its served dtype (bfloat16 ones packed for oneDNN: an opaque tensor whose
storage torch does not show, counted by its elements).
"""
import math

import pytest
import torch

from teegpu.config import ServerConfig
from teegpu.model.loading import load_weights
from teegpu.model.products import packs_bfloat16
from teegpu.server_process import ServerProcess, private_endpoint
from teegpu.protocol import WIRE_DTYPES
from teegpu.server.linear_server import LinearServer
from teegpu.tee.engine import Engine, EngineConfig, GenerationConfig


def tensors_held(root) -> list[torch.Tensor]:
    """Every tensor reachable from `root` through teegpu objects and containers, once per storage."""
    seen, found, stack = set(), {}, [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found.setdefault(("opaque", id(obj)) if obj.is_mkldnn else obj.untyped_storage().data_ptr(), obj)
        elif isinstance(obj, dict):
            stack += list(obj.values())
        elif isinstance(obj, (list, tuple, set)):
            stack += list(obj)
        elif type(obj).__module__.startswith("teegpu"):
            stack += [getattr(obj, n) for n in getattr(type(obj), "__slots__", ()) if hasattr(obj, n)]
            stack += list(getattr(obj, "__dict__", {}).values())
    return list(found.values())


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size() if t.is_mkldnn else t.untyped_storage().nbytes()


def linear_shapes(weights) -> set[tuple[int, int]]:
    shapes = {weights.shape(op) for op, _ in weights.served_keys()}
    return shapes | {s[::-1] for s in shapes}


def linear_params(weights) -> int:
    return sum(math.prod(weights.shape(op)) for op, _ in weights.served_keys())


@pytest.fixture(scope="module")
def tiny_weights(tiny_model_dir):
    return load_weights(str(tiny_model_dir))


def test_plain_trusted_side_holds_no_linear_weight(tiny_model_dir, tiny_weights):
    with Engine.open(EngineConfig(model=str(tiny_model_dir), data_plane="socket")) as engine:
        engine.generate("hold nothing you do not need", GenerationConfig(max_new_tokens=4))
        embed = engine.trusted.embed
        held = [t for t in tensors_held(engine) if t.is_floating_point()]
    assert embed.shape == (tiny_weights.config.vocab_size, tiny_weights.config.hidden_size)
    others = [t for t in held if t.data_ptr() != embed.data_ptr()]  # (the untied LM head has its shape)
    assert not [tuple(t.shape) for t in others if tuple(t.shape) in linear_shapes(tiny_weights)]
    rest = sum(nbytes(t) for t in others)
    assert rest < 0.02 * linear_params(tiny_weights) * 4  # norms and rotary tables only


def test_otp_trusted_side_holds_the_ring_weights_and_pads(tiny_model_dir, tiny_weights):
    rows = 8
    with Engine.open(EngineConfig(model=str(tiny_model_dir), privacy="otp", mask_pool_rows=rows,
                                  data_plane="socket")) as engine:
        held = [t for t in tensors_held(engine) if t.data_ptr() != engine.trusted.embed.data_ptr()]
        pool = engine.linears.pool
    ring = [t for t in held if t.dtype in (torch.int8, torch.int16)]  # int8 halves, or int16 (ring_kernel)
    assert sum(nbytes(t) for t in ring) == 2 * linear_params(tiny_weights)  # each linear weight, once
    assert not [t.shape for t in held if t.dtype not in (torch.int8, torch.int16)
                and tuple(t.shape) in linear_shapes(tiny_weights)]
    pads = sum(rows * sum(tiny_weights.shape(op)) * 8 for op, _ in tiny_weights.served_keys())
    assert pool_bytes(pool) <= pads  # pads made per weight, a pool's worth, not for the whole run


def pool_bytes(pool) -> int:
    """Bytes of the pads and products the pool holds (ready or on their way)."""
    return sum(nbytes(t) for q in pool._queue.values() for batch, _ in q for t in (batch._r, batch.rw)
               if t is not None)


def test_otp_trusted_side_with_a_pad_server_holds_no_ring_weights(tiny_model_dir, tiny_weights):
    """The pad server multiplies the pads: no ring weights here, only W^T s for --verify."""
    rows = 8
    with ServerProcess(ServerConfig(model=str(tiny_model_dir), endpoint=private_endpoint(), privacy="otp")) as pad:
        config = EngineConfig(model=str(tiny_model_dir), privacy="otp", mask_pool_rows=rows, verify=True,
                              pad_server=(pad.wait_ready(),))
        with Engine.open(config) as engine:
            engine.generate("hold nothing you do not need", GenerationConfig(max_new_tokens=4))
            engine.linears.pool.wait_ready()
            held = [t for t in tensors_held(engine) if t.data_ptr() != engine.trusted.embed.data_ptr()]
            pool = engine.linears.pool
            assert pool.stats.server_rows > 0
            pool_worth = sum(rows * sum(tiny_weights.shape(op)) * 8 for op, _ in tiny_weights.served_keys())
            assert pool_bytes(pool) <= 2 * pool_worth  # a partly taken batch is held whole until its last row goes
    assert not [t for t in held if t.dtype in (torch.int8, torch.int16)]
    vectors = engine.linears.ring_verifier.ws
    assert sum(nbytes(t) for t in vectors.values()) < 0.01 * linear_params(tiny_weights) * 2


@pytest.mark.parametrize("privacy,dtype", [("otp", "float32"), ("plain", "bfloat16"), ("plain", "float32")])
def test_server_holds_each_weight_once_in_its_served_form(tiny_weights, privacy, dtype):
    server = LinearServer(tiny_weights, torch.device("cpu"), WIRE_DTYPES[dtype], privacy=privacy)
    weights = [t for t in tensors_held(server) if t.numel() > 16]  # (not ring.py's 16 place values)
    if privacy == "otp":
        ring = {torch.int8, torch.int16}  # int8 halves, or int16 (products.ring_kernel)
        assert {t.dtype for t in weights} <= ring | {torch.int64}
        assert sum(nbytes(t) for t in weights if t.dtype in ring) == 2 * linear_params(tiny_weights)
        corrections = sum(8 * tiny_weights.shape(op)[0] for op, _ in tiny_weights.served_keys())  # one per row
        assert sum(nbytes(t) for t in weights if t.dtype == torch.int64) == corrections
    else:
        assert {t.dtype for t in weights} == {WIRE_DTYPES[dtype]}
        assert sum(nbytes(t) for t in weights) == linear_params(tiny_weights) * WIRE_DTYPES[dtype].itemsize
        assert all(t.is_mkldnn == (dtype == "bfloat16" and packs_bfloat16()) for t in weights)  # not on AVX2
