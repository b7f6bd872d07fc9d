"""Model configuration, weight loading and the LLaMA math. Shared by both sides; no sockets."""
from teegpu.model.config import ModelConfig, RopeConfig
from teegpu.model.loading import load_tokenizer, load_weights, resolve_model_path
from teegpu.model.weights import ModelWeights

__all__ = ["ModelConfig", "RopeConfig", "ModelWeights", "load_weights", "load_tokenizer", "resolve_model_path"]
