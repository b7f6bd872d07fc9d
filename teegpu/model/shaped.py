"""Random-weight LLaMA models of a named shape, written without a hub: for benchmarks and tests at
the sizes of real models (Llama-3.2-1B is the seed's workload).

The weights are seeded (the same seed writes the same bytes) and scaled so that activations stay
in a realistic range: each projection keeps unit-variance inputs at unit variance, the two that
write into the residual stream are scaled down by sqrt(2 layers) (as GPT-2 initialises them), and
embedding rows have norm about 1, so logits have unit spread (no bf16 overflow, no all-ties argmax).
They give a real model's shapes, timings and bytes, not meaningful text.

The tokenizer is SmolLM2's (the default model's), its BPE vocabulary padded with <|reserved_N|>
tokens up to the shape's vocabulary (128256 for Llama 3), so that every id decodes.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from teegpu.config import ShapedModelConfig
from teegpu.errors import ConfigError
from teegpu.model.config import ModelConfig
from teegpu.model.llama import rope_inv_freq
from teegpu.model.loading import GGUF_LAYER_NAMES, HF_LAYER_NAMES, default_model_path, permute_for_gguf
from teegpu.model.tokenizer import transformers_tokenizer

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
SHAPES = {  # transformers LlamaConfig fields
    "tiny": dict(vocab_size=49152, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                         rope_theta=500000.0, rope_scaling=LLAMA3_ROPE, rms_norm_eps=1e-5, tie_word_embeddings=True),
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                       rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
}
STORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def hf_config(shape: str, layers: int | None = None) -> dict:
    """The shape's config.json (with fewer layers if asked)."""
    if shape not in SHAPES:
        raise ConfigError(f"unknown shape {shape!r}: choose one of {tuple(SHAPES)}")
    hf = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu",
          "attention_bias": False, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2, **SHAPES[shape]}
    if layers is not None:
        hf["num_hidden_layers"] = layers
    return hf


def shaped_tensors(hf: dict, seed: int, dtype: torch.dtype) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """(shard name, {HF tensor name: tensor}) for the embeddings, each layer, then the head; drawn in
    this fixed order from one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    h, inter, layers = hf["hidden_size"], hf["intermediate_size"], hf["num_hidden_layers"]
    head_dim = hf.get("head_dim") or h // hf["num_attention_heads"]
    q, kv = hf["num_attention_heads"] * head_dim, hf["num_key_value_heads"] * head_dim

    def normal(rows: int, cols: int, std: float) -> torch.Tensor:
        return (torch.randn(rows, cols, generator=g) * std).to(dtype)

    def norm() -> torch.Tensor:
        return (1.0 + 0.1 * torch.randn(h, generator=g)).to(dtype)

    residual = 1.0 / math.sqrt(2 * layers)
    yield "embed", {"model.embed_tokens.weight": normal(hf["vocab_size"], h, 1 / math.sqrt(h))}
    for i in range(layers):
        shapes = {"self_attn.q_proj": (q, h, 1), "self_attn.k_proj": (kv, h, 1), "self_attn.v_proj": (kv, h, 1),
                  "self_attn.o_proj": (h, q, residual), "mlp.gate_proj": (inter, h, 1),
                  "mlp.up_proj": (inter, h, 1), "mlp.down_proj": (h, inter, residual)}
        shard = {f"model.layers.{i}.input_layernorm.weight": norm(),
                 f"model.layers.{i}.post_attention_layernorm.weight": norm()}
        for name, (rows, cols, scale) in shapes.items():
            shard[f"model.layers.{i}.{name}.weight"] = normal(rows, cols, scale / math.sqrt(cols))
        yield f"layer-{i}", shard
    head = {"model.norm.weight": norm()}
    if not hf["tie_word_embeddings"]:
        head["lm_head.weight"] = normal(hf["vocab_size"], h, 1 / math.sqrt(h))
    yield "head", head


def write_shaped_model(config: ShapedModelConfig) -> Path:
    """Write the model; returns the directory (hf) or file (gguf) to pass as --model."""
    hf = hf_config(config.shape, config.layers)
    dtype = STORE_DTYPES[config.dtype]
    out = Path(config.out).expanduser()
    shards = shaped_tensors(hf, config.seed, dtype)
    progress = tqdm(shards, total=hf["num_hidden_layers"] + 2, desc=f"writing {config.shape}", unit="shard",
                    file=sys.stderr, leave=False)
    if config.format == "hf":
        write_hf(out, {**hf, "torch_dtype": config.dtype}, progress)
    else:
        write_gguf(out, hf, progress, config.dtype)
    return out


def write_hf(out: Path, hf: dict, shards) -> None:
    """config.json, one safetensors file per shard with their index, and the tokenizer."""
    out.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for name, tensors in shards:
        save_file(tensors, out / f"{name}.safetensors", metadata={"format": "pt"})
        weight_map |= {t: f"{name}.safetensors" for t in tensors}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(hf, indent=1))
    padded_tokenizer(hf["vocab_size"], out)


def padded_tokenizer(vocab_size: int, out: Path) -> None:
    """SmolLM2's tokenizer saved into `out`, its BPE vocabulary padded to `vocab_size` ids."""
    tokenizer = transformers_tokenizer(default_model_path())
    if vocab_size < len(tokenizer):
        raise ConfigError(f"vocabulary {vocab_size} is smaller than the tokenizer's {len(tokenizer)}")
    tokenizer.save_pretrained(out)
    spec = json.loads((out / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    for i in range(len(tokenizer), vocab_size):
        vocab[f"<|reserved_{i}|>"] = i
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))


def write_gguf(out: Path, hf: dict, shards, dtype: str) -> None:
    """One GGUF file as llama.cpp's converter writes a LLaMA: q/k rows permuted for its rotary
    layout, llama3 rope scaling as precomputed frequency factors, the tokenizer in the metadata."""
    import gguf

    if out.suffix != ".gguf":
        raise ConfigError(f"--out {out}: a GGUF model is one file ending in .gguf")
    out.parent.mkdir(parents=True, exist_ok=True)
    config = ModelConfig.from_hf(hf)
    writer = gguf.GGUFWriter(out, "llama", use_temp_file=True)
    _gguf_metadata(writer, config)
    raw = gguf.GGMLQuantizationType.BF16 if dtype == "bfloat16" else None
    gguf_of_short = {short: name for name, short in GGUF_LAYER_NAMES.items()}
    hf_to_gguf = {f"{long}.weight": gguf_of_short[short] for long, short in HF_LAYER_NAMES.items()}
    for _, tensors in shards:
        for name, t in tensors.items():
            if name.startswith("model.layers."):
                i, rest = name.removeprefix("model.layers.").split(".", 1)
                name = f"blk.{i}.{hf_to_gguf[rest]}.weight"
                if rest.startswith(("self_attn.q_proj", "self_attn.k_proj")):
                    heads = config.num_heads if "q_proj" in rest else config.num_kv_heads
                    t = permute_for_gguf(t, heads)
            else:
                name = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                        "lm_head.weight": "output.weight"}[name]
            array = t.contiguous().view(torch.int16).numpy().view("uint16") if raw else t.numpy()
            writer.add_tensor(name, array, raw_dtype=raw)
    if config.rope.rope_type == "llama3":
        plain = rope_inv_freq(replace(config.rope, rope_type="default"), config.head_dim)
        writer.add_tensor("rope_freqs.weight", (plain / rope_inv_freq(config.rope, config.head_dim)).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _gguf_metadata(writer, config: ModelConfig) -> None:
    import gguf

    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope.theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    source = gguf.GGUFReader(default_model_path())  # SmolLM2's tokenizer, padded to the vocabulary
    fields = {k: f.contents() for k, f in source.fields.items() if k.startswith("tokenizer.")}
    tokens = fields["tokenizer.ggml.tokens"]
    writer.add_tokenizer_model(fields["tokenizer.ggml.model"])
    writer.add_tokenizer_pre(fields["tokenizer.ggml.pre"])
    writer.add_token_list(tokens + [f"<|reserved_{i}|>" for i in range(len(tokens), config.vocab_size)])
    pad = config.vocab_size - len(tokens)
    writer.add_token_types(fields["tokenizer.ggml.token_type"] + [gguf.TokenType.NORMAL] * pad)
    writer.add_token_merges(fields["tokenizer.ggml.merges"])
    writer.add_bos_token_id(fields["tokenizer.ggml.bos_token_id"])
    writer.add_eos_token_id(fields["tokenizer.ggml.eos_token_id"])
    writer.add_unk_token_id(fields["tokenizer.ggml.unknown_token_id"])
    writer.add_pad_token_id(fields["tokenizer.ggml.padding_token_id"])
    writer.add_add_bos_token(fields["tokenizer.ggml.add_bos_token"])
    writer.add_chat_template(fields["tokenizer.chat_template"])

