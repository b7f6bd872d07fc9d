"""Random-weight models of real LLaMA shapes (teegpu shaped-model): seeded, loadable through the
same paths as a real model (HF directory and GGUF), and run by the split runtime exactly like
transformers runs them."""
import hashlib
import math

import pytest
import torch

from conftest import hf_greedy
from teegpu.cli import main as cli_main
from teegpu.config import ShapedModelConfig
from teegpu.errors import ConfigError
from teegpu.model.config import ModelConfig
from teegpu.model.loading import load_weights
from teegpu.model.tokenizer import load_tokenizer
from teegpu.model.reference import transformers_model
from teegpu.model.shaped import hf_config, padded_tokenizer, write_shaped_model
from teegpu.options import rpcs_per_forward
from teegpu.tee.engine import Engine, EngineConfig, GenerationConfig


def digests(folder) -> dict:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.glob("*.safetensors"))}


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """The tiny shape written twice from one seed: as a HF directory and as a GGUF file."""
    root = tmp_path_factory.mktemp("shaped")
    hf = write_shaped_model(ShapedModelConfig(shape="tiny", out=str(root / "hf"), dtype="float32", seed=7))
    gguf = write_shaped_model(ShapedModelConfig(shape="tiny", out=str(root / "tiny.gguf"), format="gguf",
                                                dtype="float32", seed=7))
    return hf, gguf


def test_the_same_seed_writes_the_same_files(tiny_pair, tmp_path):
    hf, _ = tiny_pair
    assert cli_main(["shaped-model", "--shape", "tiny", "--out", str(tmp_path / "again"), "--dtype", "float32",
                     "--seed", "7"]) == 0
    again = digests(tmp_path / "again")
    assert again == digests(hf) and len(again) == 5  # embeddings, 3 layers, head
    write_shaped_model(ShapedModelConfig(shape="tiny", out=str(tmp_path / "other"), dtype="float32", seed=8))
    assert all(digests(tmp_path / "other")[name] != digest for name, digest in again.items())


def test_hf_directory_and_gguf_load_the_same_weights(tiny_pair):
    hf, gguf = (load_weights(str(p)) for p in tiny_pair)
    assert hf.config.num_layers == gguf.config.num_layers == 3
    for op, layer in hf.served_keys():  # the GGUF path undoes llama.cpp's q/k permutation
        assert torch.equal(hf.for_op(op, layer), gguf.for_op(op, layer)), (op, layer)
    assert torch.equal(hf.read("embed"), gguf.read("embed"))
    text = "Shaped models tokenize like the real one."
    assert load_tokenizer(str(tiny_pair[0])).encode(text) == load_tokenizer(str(tiny_pair[1])).encode(text)


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_split_matches_transformers_on_a_shaped_model(tiny_pair, fmt):
    path = str(tiny_pair[0] if fmt == "hf" else tiny_pair[1])
    ref = transformers_model(path)
    with Engine.open(EngineConfig(model=path, timeout_ms=20_000)) as engine:
        ids = engine.encode("A shaped model reads this sentence and continues it", chat=False)
        ref_new, ref_logits = hf_greedy(ref, ids, 16)
        logits = engine.forward(ids, 0, engine.new_cache(len(ids)), all_logits=True)
        assert (logits - ref_logits[: len(ids)]).abs().max() < 1e-3
        result = engine.generate(ids, GenerationConfig(max_new_tokens=16, stop_at_eos=False))
        assert result.token_ids == ref_new
        assert result.rpc["calls"] == 16 * rpcs_per_forward(3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activations_stay_in_a_realistic_range(tiny_pair, dtype):
    """Finite logits with a spread (no overflow, no all-ties argmax), in float32 and bfloat16."""
    ref = transformers_model(str(tiny_pair[0]), dtype)
    with torch.inference_mode():
        out = ref(torch.arange(100, 164).view(1, -1), output_hidden_states=True)
    logits = out.logits[0].float()
    assert torch.isfinite(logits).all()
    assert 0.3 < float(logits.std(dim=-1).mean()) < 10
    top2 = logits.topk(2, dim=-1).values
    assert float((top2[:, 0] > top2[:, 1]).float().mean()) > 0.8  # (bf16 rounding ties a few rows)
    assert len(set(logits.argmax(dim=-1).tolist())) > 16  # the argmax moves with the input
    assert max(float(h.float().abs().max()) for h in out.hidden_states) < 100


def test_named_shapes_are_the_real_architectures():
    l1b = ModelConfig.from_hf(hf_config("llama-3.2-1b"))
    assert (l1b.hidden_size, l1b.num_layers, l1b.num_heads, l1b.num_kv_heads, l1b.intermediate_size,
            l1b.vocab_size, l1b.rope.rope_type, l1b.tie_word_embeddings) == (
        2048, 16, 32, 8, 8192, 128256, "llama3", True)
    l8b = ModelConfig.from_hf(hf_config("llama-3-8b"))
    assert (l8b.hidden_size, l8b.num_layers, l8b.intermediate_size, l8b.tie_word_embeddings) == (4096, 32, 14336, False)
    per_layer = sum(math.prod(s) for n, s in l1b.linear_shapes().items() if n != "lm_head") + 2 * 2048
    assert 128256 * 2048 + 16 * per_layer + 2048 == 1_235_814_400  # Llama-3.2-1B's published count
    assert ModelConfig.from_hf(hf_config("llama-3-8b", layers=1)).num_layers == 1
    with pytest.raises(ConfigError, match="shape"):
        ShapedModelConfig(shape="llama-9b")
    with pytest.raises(ConfigError, match="layers"):
        ShapedModelConfig(layers=0)


def test_every_id_of_a_llama3_vocabulary_decodes(tmp_path):
    from transformers import AutoTokenizer

    padded_tokenizer(128256, tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) == 128256
    assert tok.decode([128255]) == "<|reserved_128255|>"
    assert tok.decode([49151, 60000]).endswith("<|reserved_60000|>")
    assert tok("plain text")["input_ids"] == load_tokenizer(None).encode("plain text")
