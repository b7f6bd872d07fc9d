"""The trusted side: the engine, the batching scheduler, sampling, the one-time pads (mask pool),
Freivalds verification and the KV caches. Secrets (pads, check vectors, the conversation) live here
only; the untrusted server never imports this package."""
from teegpu.tee.engine import Engine, GenerationResult
from teegpu.tee.scheduler import Scheduler

__all__ = ["Engine", "GenerationResult", "Scheduler"]
