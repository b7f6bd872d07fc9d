"""The trusted side. Secrets (the KV cache, later masks and check vectors) live here only."""
from teegpu.tee.engine import Engine, EngineConfig, GenerationConfig, GenerationResult

__all__ = ["Engine", "EngineConfig", "GenerationConfig", "GenerationResult"]
