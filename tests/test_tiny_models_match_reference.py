"""Random tiny LLaMAs in Hugging Face format (GQA, tied/untied, llama3 rope) match transformers,
through Engine.open, which starts a real server process for the directory."""
import pytest
import torch

from conftest import hf_greedy, save_tiny_llama
from teegpu.tee.engine import Engine, EngineConfig, GenerationConfig
from teegpu.options import rpcs_per_forward

VARIANTS = {
    "gqa-untied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "mha-tied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    "llama3-rope": dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=128, tie_word_embeddings=True,
                        max_position_embeddings=512, rope_theta=500000.0,
                        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                          high_freq_factor=4.0, original_max_position_embeddings=32)),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_tiny_llama_matches_transformers(variant, tmp_path):
    ref = save_tiny_llama(tmp_path, seed=len(variant), **VARIANTS[variant])
    if variant == "llama3-rope":  # the scaling must really be in effect for the test to mean anything
        assert ref.config.rope_parameters["rope_type"] == "llama3"
    with Engine.open(EngineConfig(model=str(tmp_path), timeout_ms=20_000)) as engine:
        ids = engine.encode("A tiny model reads this sentence and continues it", chat=False)
        ref_new, ref_logits = hf_greedy(ref, ids, 32)
        cache = engine.new_cache(len(ids) + 32)
        logits = engine.forward(ids, 0, cache, all_logits=True)
        assert (logits - ref_logits[: len(ids)]).abs().max() < 1e-3
        for i, token in enumerate(ref_new[:8]):
            logits = engine.forward([token], len(ids) + i, cache)
            assert (logits[0] - ref_logits[len(ids) + i]).abs().max() < 1e-3
        result = engine.generate(ids, GenerationConfig(max_new_tokens=32, stop_at_eos=False))
        assert result.token_ids == ref_new
        assert result.rpc["calls"] == 32 * rpcs_per_forward(ref.config.num_hidden_layers)


def test_llama3_scaling_changes_the_rotary_frequencies():
    """Guard against a silently ignored rope_scaling: llama3 tables differ from the default ones."""
    from teegpu.model.config import RopeConfig
    from teegpu.model.llama import rope_inv_freq

    plain = rope_inv_freq(RopeConfig(theta=500000.0), 64)
    scaled = rope_inv_freq(RopeConfig(theta=500000.0, rope_type="llama3", factor=8.0,
                                      original_max_position_embeddings=32), 64)
    assert torch.equal(plain[:1], scaled[:1])  # the highest frequency (wavelength < 32/4) is kept
    assert torch.allclose(scaled[-1], plain[-1] / 8.0)  # low frequencies divided by the factor
