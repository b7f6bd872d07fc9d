"""Model configuration, weight loading and the LLaMA math. Shared by both sides; no sockets.
The tokenizer (`teegpu.model.tokenizer`) is the trusted side's alone, so it is not imported here."""
from teegpu.model.config import ModelConfig, RopeConfig
from teegpu.model.loading import load_weights, resolve_model_path
from teegpu.model.weights import ModelWeights

__all__ = ["ModelConfig", "RopeConfig", "ModelWeights", "load_weights", "resolve_model_path"]
