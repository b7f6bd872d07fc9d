"""Model configuration, parsed from a Hugging Face config.json or GGUF metadata."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from teegpu.errors import ModelLoadError

ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True, slots=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    attention_factor: float = 1.0  # multiplies cos and sin (HF's attention_scaling)

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ModelLoadError(f"rope type {self.rope_type!r} is not supported (supported: {ROPE_TYPES})")
        if not (self.theta > 0 and self.factor > 0 and math.isfinite(self.attention_factor)):
            raise ModelLoadError(f"invalid rope parameters: {self}")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope: RopeConfig

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ModelLoadError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"model config: {self.num_heads} query heads not divisible by {self.num_kv_heads} kv heads"
            )
        if self.head_dim % 2:
            raise ModelLoadError(f"model config: head_dim {self.head_dim} must be even for rotary embeddings")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) of each fused linear; the server validates requests against these."""
        h = self.hidden_size
        return {
            "qkv": (self.q_size + 2 * self.kv_size, h),
            "o": (h, self.q_size),
            "gate_up": (2 * self.intermediate_size, h),
            "down": (h, self.intermediate_size),
            "lm_head": (self.vocab_size, h),
        }

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(**{**d, "rope": RopeConfig(**d["rope"])})

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        """From a transformers LlamaConfig dict (4.x rope_scaling or 5.x rope_parameters)."""
        model_type = hf.get("model_type")
        if model_type != "llama":
            raise ModelLoadError(f"model_type {model_type!r}: teegpu runs LLaMA-architecture models only")
        if hf.get("hidden_act", "silu") != "silu":
            raise ModelLoadError(f"hidden_act {hf['hidden_act']!r} is not supported (LLaMA uses silu)")
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise ModelLoadError("linear biases (attention_bias / mlp_bias) are not supported")
        heads = hf["num_attention_heads"]
        rope_params = dict(hf.get("rope_parameters") or {})
        rope_params.update(hf.get("rope_scaling") or {})
        theta = rope_params.get("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = rope_params.get("rope_type", rope_params.get("type", "default"))
        rope = RopeConfig(
            theta=float(theta),
            rope_type=rope_type,
            factor=float(rope_params.get("factor", 1.0)),
            low_freq_factor=float(rope_params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rope_params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(
                rope_params.get("original_max_position_embeddings", hf.get("max_position_embeddings", 8192))
            ),
            attention_factor=float(rope_params.get("attention_factor") or 1.0),
        )
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            rope=rope,
        )
