"""The split adds no error: for every dtype, privacy mode and plane, the split run's logits are the
in-process engine's (LocalLinears, `teegpu generate --local`) bit for bit, on whatever CPU the
tests run on and under any ONEDNN_MAX_CPU_ISA cap (docs/fidelity.md, claim 1)."""
import pytest
import torch

from conftest import VARIANTS, connect_engine
from teegpu.config import ServerConfig
from teegpu.model import products
from teegpu.model.llama import Segment, rope_inv_freq, rope_tables
from teegpu.options import DTYPES
from teegpu.protocol import WIRE_DTYPES
from teegpu.tee.engine import Engine
from teegpu.server_process import ServerProcess, private_endpoint
from teegpu.tee.linears import LocalLinears

PROMPT = "Explain why the sky is blue."
DECODE_STEPS = 4
CASES = ([(dtype, "plain", variant, "doorbell") for dtype in DTYPES for variant in VARIANTS]
         + [("float32", "plain", "shm", "socket"), ("bfloat16", "plain", "shm", "socket")]
         + [("float32", "otp", "shm", "doorbell")])  # otp's exactness is the ring's: one plane shows it


@pytest.fixture(scope="module")
def in_process(smollm2):
    """The in-process engine of a dtype and privacy mode, built on first use."""
    weights, tok = smollm2
    engines = {}

    def get(dtype: str, privacy: str) -> Engine:
        if (dtype, privacy) not in engines:
            act = torch.float32 if privacy == "otp" else WIRE_DTYPES[dtype]
            engines[dtype, privacy] = Engine(weights, tok, LocalLinears(weights, act, privacy), dtype=act)
        return engines[dtype, privacy]

    return get


def greedy_logits(engine: Engine, ids: list[int], steps: int) -> list[torch.Tensor]:
    """Every prefill row's logits, then each greedy decode step's."""
    cache = engine.new_cache(len(ids) + steps)
    out = [engine.forward(ids, 0, cache, all_logits=True)]
    for i in range(steps):
        out.append(engine.forward([int(out[-1][-1].argmax())], len(ids) + i, cache))
    return out


@pytest.mark.parametrize("dtype, privacy, variant, control", CASES)
def test_split_logits_are_the_in_process_logits_bit_for_bit(dtype, privacy, variant, control, smollm2,
                                                             smollm2_servers, in_process):
    weights, tok = smollm2
    kw = dict(verify=True, mask_pool_rows=48) if privacy == "otp" else {}
    split = connect_engine(weights, tok, smollm2_servers, variant, dtype=dtype, privacy=privacy,
                           control_plane=control, **kw)
    local = in_process(dtype, privacy)
    assert split.dtype == local.dtype
    ids = local.encode(PROMPT, chat=True)
    for step, (got, want) in enumerate(zip(greedy_logits(split, ids, DECODE_STEPS),
                                           greedy_logits(local, ids, DECODE_STEPS))):
        assert torch.equal(got, want), f"step {step}: max difference {(got - want).abs().max().item()}"
    split.close()


def test_otp_without_verify_is_the_in_process_run_bit_for_bit(smollm2, smollm2_servers, in_process):
    """Without --verify the integer product is rescaled block by block as its pads come off; with
    a pool of 4 rows most prompt rows' pads are made online (the stall path): the same bits."""
    weights, tok = smollm2
    split = connect_engine(weights, tok, smollm2_servers, "shm", privacy="otp", mask_pool_rows=4)
    local = in_process("float32", "otp")
    ids = local.encode(PROMPT, chat=True)
    for step, (got, want) in enumerate(zip(greedy_logits(split, ids, DECODE_STEPS),
                                           greedy_logits(local, ids, DECODE_STEPS))):
        assert torch.equal(got, want), f"step {step}: max difference {(got - want).abs().max().item()}"
    assert split.linears.pool.stats.as_dict()["stall_ms"] > 0  # the online path was taken too
    split.close()


def batched_step(engine: Engine) -> torch.Tensor:
    """One sequence's prompt rows and another's decode row in one packed step."""
    a, b = engine.encode("The capital of France is"), engine.encode("def fibonacci(n):")
    ca, cb = engine.new_cache(len(a)), engine.new_cache(len(b) + 1)
    engine.forward(b, 0, cb)
    return engine.forward_packed(a + [b[-1]], [Segment(ca, 0, len(a)), Segment(cb, len(b), 1)], None)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_batched_step_is_the_in_process_step_bit_for_bit(dtype, smollm2, smollm2_servers, in_process):
    """The API's packed step: one sequence's prompt rows and another's decode row together."""
    weights, tok = smollm2
    split, local = connect_engine(weights, tok, smollm2_servers, "shm", dtype=dtype), in_process(dtype, "plain")
    assert torch.equal(*(batched_step(engine) for engine in (split, local)))
    split.close()


def test_the_comparison_can_fail(smollm2, smollm2_servers, in_process, monkeypatch):
    """Control: the in-process engine on another float32 kernel (MKL for every product) gives other
    bits, so bitwise equality above is not a property of any two runs."""
    weights, tok = smollm2
    split = connect_engine(weights, tok, smollm2_servers, "ipc")
    local = in_process("float32", "plain")
    ids = local.encode(PROMPT, chat=True)
    assert torch.equal(greedy_logits(split, ids, 0)[0], greedy_logits(local, ids, 0)[0])
    monkeypatch.setattr(products, "onednn_macs", lambda: 1 << 62)
    assert not torch.equal(greedy_logits(split, ids, 0)[0], greedy_logits(local, ids, 0)[0])
    split.close()



def test_the_in_process_bits_do_not_depend_on_the_threads_the_process_was_left_with(smollm2, monkeypatch):
    """A small step leaves the trusted process on one thread (Engine.forward_packed); an in-process
    engine built and run then still gives each product the threads the server gives it, here every
    product on every core (the choice of a host with TEEGPU_THREADED_MACS=0 measured)."""
    weights, tok = smollm2
    monkeypatch.setenv("TEEGPU_THREADED_MACS", "0")
    products.threaded_macs.cache_clear()
    server = ServerProcess(ServerConfig(endpoint=private_endpoint(), dtype="float32"))
    before = torch.get_num_threads()
    try:
        split = Engine.connect(weights, tok, server.wait_ready(), data_plane="shm")
        torch.set_num_threads(1)
        local = Engine(weights, tok, LocalLinears(weights, torch.float32), dtype=torch.float32)
        assert torch.equal(*(batched_step(engine) for engine in (split, local)))
        split.close()
    finally:
        torch.set_num_threads(before)
        server.stop()
        products.threaded_macs.cache_clear()


def test_every_engine_holds_the_same_rope_tables(smollm2):
    """Two engines of one process (the split's and the in-process one) grow their rotary tables to
    their own lengths, at their own addresses: the rows they share must be the same bits."""
    weights, _ = smollm2
    tables = [rope_tables(weights.config, n) for n in (37, 37, 64, 1000, 37)]
    for t in tables:
        assert torch.equal(t.cos[:37], tables[0].cos[:37]) and torch.equal(t.sin[:37], tables[0].sin[:37])
    angle = 36 * rope_inv_freq(weights.config.rope, weights.config.head_dim)  # float32, as the table's
    assert torch.allclose(tables[0].cos[36, :32], angle.double().cos().float() * weights.config.rope.attention_factor)
