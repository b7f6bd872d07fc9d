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
    ConfigError, ContextLengthError, HandshakeError, ModelLoadError, ProtocolError, ServerError,
    ServerUnavailable, TeegpuError,
)
from teegpu.server.linear_server import ServerConfig, serve
from teegpu.tee.engine import Engine, EngineConfig, GenerationConfig, GenerationResult

__all__ = [
    "Engine", "EngineConfig", "GenerationConfig", "GenerationResult", "ServerConfig", "serve",
    "TeegpuError", "ConfigError", "ContextLengthError", "HandshakeError", "ModelLoadError", "ProtocolError",
    "ServerError", "ServerUnavailable",
]
