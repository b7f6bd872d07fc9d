"""bfloat16 / float16 on the server and the wire give the tokens transformers gives in that dtype."""
import pytest
import torch

from conftest import VARIANTS, connect_engine, hf_generate
from teegpu.tee.engine import Engine, GenerationConfig
from teegpu.tee.linears import LocalLinears
from test_split_matches_reference import PROMPTS

STEPS = 24


def check_greedy(engine, reference):
    for prompt, chat in PROMPTS:
        ids = engine.encode(prompt, chat=chat)
        result = engine.generate(prompt, GenerationConfig(max_new_tokens=STEPS, stop_at_eos=False), chat=chat)
        assert result.token_ids == hf_generate(reference, ids, STEPS), prompt


@pytest.mark.parametrize("variant", VARIANTS)
def test_bfloat16_split_greedy_matches_bfloat16_transformers(variant, smollm2, hf_smollm2_in, smollm2_servers):
    weights, tok = smollm2
    engine = connect_engine(weights, tok, smollm2_servers, variant, dtype="bfloat16")
    assert engine.dtype == torch.bfloat16 and engine.client.data_plane == ("shm" if variant == "shm" else "socket")
    check_greedy(engine, hf_smollm2_in(torch.bfloat16))
    engine.close()


def test_float16_split_greedy_matches_float16_transformers(smollm2, hf_smollm2_in, smollm2_servers):
    weights, tok = smollm2
    engine = connect_engine(weights, tok, smollm2_servers, "shm", dtype="float16")
    check_greedy(engine, hf_smollm2_in(torch.float16))
    engine.close()


def test_bfloat16_tee_only_matches_bfloat16_transformers(smollm2, hf_smollm2_in):
    weights, tok = smollm2
    engine = Engine(weights, tok, LocalLinears(weights, torch.bfloat16), dtype=torch.bfloat16)
    check_greedy(engine, hf_smollm2_in(torch.bfloat16))


def test_bfloat16_differs_from_float32(smollm2, smollm2_servers):
    """The dtype really reaches the server: bf16 products are not the fp32 ones."""
    weights, tok = smollm2
    engines = [connect_engine(weights, tok, smollm2_servers, "ipc", dtype=d) for d in ("float32", "bfloat16")]
    ids = engines[0].encode("The capital of France is")
    logits = [e.forward(ids, 0, e.new_cache(len(ids))) for e in engines]
    assert 1e-3 < (logits[0] - logits[1]).abs().max() < 5.0
    assert engines[1].hello.dtype == "bfloat16"
    for e in engines:
        e.close()
