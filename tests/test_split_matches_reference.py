"""The split runtime (two processes over ZeroMQ) computes what transformers computes."""
import pytest

from conftest import VARIANTS, connect_engine, hf_greedy
from teegpu.options import rpcs_per_forward
from teegpu.tee.engine import GenerationConfig

PROMPTS = [
    ("The capital of France is", False),
    ("Explain why the sky is blue.", True),
    ("def fibonacci(n):", False),
]


@pytest.mark.parametrize("transport", VARIANTS)
def test_prefill_and_decode_logits_match(transport, smollm2, hf_smollm2, smollm2_servers):
    weights, tok = smollm2
    engine = connect_engine(weights, tok, smollm2_servers, transport)
    ids = engine.encode("Tell me about the moon.", chat=True)
    steps = 8
    ref_new, ref_logits = hf_greedy(hf_smollm2, ids, steps)
    cache = engine.new_cache(len(ids) + steps)
    logits = engine.forward(ids, 0, cache, all_logits=True)
    assert (logits - ref_logits[: len(ids)]).abs().max() < 1e-3
    for i, token in enumerate(ref_new):
        logits = engine.forward([token], len(ids) + i, cache)
        assert (logits[0] - ref_logits[len(ids) + i]).abs().max() < 1e-3, f"decode step {i}"
    engine.client.close()


@pytest.mark.parametrize("transport", ["shm"])  # every plane equals in-process: test_split_equals_in_process
def test_greedy_32_tokens_identical(transport, smollm2, hf_smollm2, smollm2_servers):
    weights, tok = smollm2
    engine = connect_engine(weights, tok, smollm2_servers, transport)
    for prompt, chat in PROMPTS:
        ids = engine.encode(prompt, chat=chat)
        ref_new, _ = hf_greedy(hf_smollm2, ids, 32)
        result = engine.generate(prompt, GenerationConfig(max_new_tokens=32, stop_at_eos=False), chat=chat)
        assert result.token_ids == ref_new, prompt
        assert result.prompt_tokens == len(ids)
    engine.client.close()


def test_round_trips_per_token(smollm2, smollm2_servers):
    """4 per decoder layer + 1 for the LM head, for the prefill and for every decode step."""
    weights, tok = smollm2
    engine = connect_engine(weights, tok, smollm2_servers, "ipc")
    result = engine.generate("Hello", GenerationConfig(max_new_tokens=5, stop_at_eos=False))
    per_forward = rpcs_per_forward(weights.config.num_layers)
    assert result.rpc["calls"] == per_forward * 5  # prefill + 4 decode forwards
    assert result.rpc["bytes_sent"] > 0 and result.rpc["bytes_received"] > 0
    engine.client.close()


def test_offload_attention_matches(smollm2, hf_smollm2, smollm2_servers):
    """The seed's schedule (Q*K^T and P*V on the server) is kept as an option and still exact."""
    weights, tok = smollm2
    engine = connect_engine(weights, tok, smollm2_servers, "ipc", offload_attention=True)
    ids = engine.encode("The capital of France is")
    ref_new, ref_logits = hf_greedy(hf_smollm2, ids, 4)
    cache = engine.new_cache(len(ids) + 4)
    before = engine.client.stats.calls
    logits = engine.forward(ids, 0, cache, all_logits=True)
    assert engine.client.stats.calls - before == 6 * weights.config.num_layers + 1
    assert (logits - ref_logits[: len(ids)]).abs().max() < 1e-3
    for i, token in enumerate(ref_new):
        logits = engine.forward([token], len(ids) + i, cache)
        assert (logits[0] - ref_logits[len(ids) + i]).abs().max() < 1e-3
    engine.client.close()


def test_sampling_is_seeded_and_top_k_1_is_greedy(smollm2, smollm2_servers):
    weights, tok = smollm2
    engine = connect_engine(weights, tok, smollm2_servers, "ipc")
    sampled = GenerationConfig(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7, stop_at_eos=False)
    a = engine.generate("Once upon a time", sampled)
    b = engine.generate("Once upon a time", sampled)
    assert a.token_ids == b.token_ids
    c = engine.generate("Once upon a time", GenerationConfig(max_new_tokens=12, temperature=1.0, seed=8,
                                                                stop_at_eos=False))
    assert c.token_ids != a.token_ids
    greedy = engine.generate("Once upon a time", GenerationConfig(max_new_tokens=12, stop_at_eos=False))
    top1 = engine.generate("Once upon a time", GenerationConfig(max_new_tokens=12, temperature=0.8, top_k=1,
                                                                   seed=3, stop_at_eos=False))
    assert top1.token_ids == greedy.token_ids
    engine.client.close()
