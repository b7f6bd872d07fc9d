"""The model's tensors, fused the way the server serves them (q|k|v, gate|up)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch

from teegpu.errors import ModelLoadError
from teegpu.model.config import ModelConfig
from teegpu.protocol import Op

LINEAR_NAMES = ("qkv", "o", "gate_up", "down")
WEIGHT_OF_OP = {Op.QKV: "qkv", Op.O: "o", Op.GATE_UP: "gate_up", Op.DOWN: "down", Op.LM_HEAD: "lm_head"}


@dataclass(slots=True)
class LayerWeights:
    attn_norm: torch.Tensor
    ffn_norm: torch.Tensor
    qkv: torch.Tensor  # (q_size + 2 kv_size, hidden)
    o: torch.Tensor  # (hidden, q_size)
    gate_up: torch.Tensor  # (2 intermediate, hidden)
    down: torch.Tensor  # (hidden, intermediate)


@dataclass(slots=True)
class ModelWeights:
    config: ModelConfig
    embed: torch.Tensor  # (vocab, hidden); trusted side only
    layers: list[LayerWeights]
    final_norm: torch.Tensor
    lm_head: torch.Tensor  # the same tensor as embed when tied
    rope_freq_factors: torch.Tensor | None  # GGUF llama3 models store scaling this way
    fingerprint: str

    @classmethod
    def from_flat(cls, config: ModelConfig, flat: dict[str, torch.Tensor], fingerprint: str | None = None):
        """Build from canonical names (embed, layers.N.qkv, ...), checking every shape."""
        h, shapes = config.hidden_size, config.linear_shapes()

        def get(name: str, shape: tuple[int, ...]) -> torch.Tensor:
            if name not in flat:
                raise ModelLoadError(f"model file has no tensor for {name}")
            t = flat[name]
            if tuple(t.shape) != shape:
                raise ModelLoadError(f"tensor {name} has shape {tuple(t.shape)}, config implies {shape}")
            return t.float().contiguous()

        layers = [
            LayerWeights(
                attn_norm=get(f"layers.{i}.attn_norm", (h,)),
                ffn_norm=get(f"layers.{i}.ffn_norm", (h,)),
                **{n: get(f"layers.{i}.{n}", shapes[n]) for n in LINEAR_NAMES},
            )
            for i in range(config.num_layers)
        ]
        embed = get("embed", (config.vocab_size, h))
        lm_head = embed if config.tie_word_embeddings else get("lm_head", shapes["lm_head"])
        factors = flat.get("rope_freq_factors")
        weights = cls(config, embed, layers, get("final_norm", (h,)), lm_head,
                      None if factors is None else factors.float(), fingerprint or "")
        if not fingerprint:
            weights.fingerprint = compute_fingerprint(weights)
        return weights

    def to_flat(self) -> dict[str, torch.Tensor]:
        flat = {"embed": self.embed, "final_norm": self.final_norm}
        if not self.config.tie_word_embeddings:
            flat["lm_head"] = self.lm_head
        if self.rope_freq_factors is not None:
            flat["rope_freq_factors"] = self.rope_freq_factors
        for i, layer in enumerate(self.layers):
            for name in ("attn_norm", "ffn_norm", *LINEAR_NAMES):
                flat[f"layers.{i}.{name}"] = getattr(layer, name)
        return flat

    def for_op(self, op: Op, layer: int) -> torch.Tensor:
        """The (out, in) weight a linear op multiplies by (layer -1 for the LM head)."""
        name = WEIGHT_OF_OP[op]
        return self.lm_head if name == "lm_head" else getattr(self.layers[layer], name)

    def served(self) -> dict[tuple[Op, int], torch.Tensor]:
        """{(op, layer): (out, in) weight} of every product the server computes."""
        return {(op, layer): self.for_op(op, layer) for op in WEIGHT_OF_OP
                for layer in ([-1] if op == Op.LM_HEAD else range(self.config.num_layers))}


def compute_fingerprint(weights: ModelWeights) -> str:
    """SHA-256 over the config and every served fp32 linear weight, in serving order.

    Both sides compute it from their own copy; the handshake compares them, so a
    server holding other weights is refused instead of answering wrongly.
    """
    h = hashlib.sha256(json.dumps(weights.config.to_dict(), sort_keys=True).encode())
    tensors = [getattr(layer, n) for layer in weights.layers for n in LINEAR_NAMES] + [weights.lm_head]
    for t in tensors:
        h.update(t.contiguous().view(torch.uint8).numpy())
    return h.hexdigest()
