"""teegpu: confidential LLaMA inference split between a trusted side and an untrusted GPU server.

    from teegpu import Engine, EngineConfig, GenerationConfig
    with Engine.open(EngineConfig()) as engine:          # starts a private GPU server
        result = engine.generate("What is 2+2?", GenerationConfig(max_new_tokens=20), chat=True)
        print(result.text, result.rpc)

    from teegpu import ServerConfig, serve
    serve(ServerConfig(endpoint="tcp://0.0.0.0:5555"))   # the untrusted side, on the GPU host
"""
__version__ = "0.1.0"

from teegpu.errors import (
    ConfigError, ContextLengthError, HandshakeError, IntegrityError, ModelLoadError, Overloaded, ProtocolError,
    ServerError,
    ServerUnavailable, TeegpuError,
)

# Imported on first use, so that the untrusted server (`python -m teegpu.cli serve`, which
# imports this package) never loads the trusted side's modules, where secrets and pads live.
_LAZY = {"Engine": "teegpu.tee.engine", "GenerationResult": "teegpu.tee.engine", "Scheduler": "teegpu.tee.scheduler",
         "EngineConfig": "teegpu.config", "GenerationConfig": "teegpu.config", "SchedulerConfig": "teegpu.config",
         "ServerConfig": "teegpu.config", "ApiConfig": "teegpu.config", "serve": "teegpu.server.linear_server"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'teegpu' has no attribute {name!r}")


__all__ = [
    "Engine", "EngineConfig", "GenerationConfig", "GenerationResult", "Scheduler", "SchedulerConfig", "ServerConfig",
    "ApiConfig", "serve", "Overloaded",
    "TeegpuError", "ConfigError", "ContextLengthError", "HandshakeError", "ModelLoadError", "ProtocolError",
    "ServerError", "ServerUnavailable", "IntegrityError",
]
