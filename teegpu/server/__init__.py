"""The untrusted GPU server. It imports model loading, protocol and transport only:
never teegpu.tee (secrets, masks and the KV cache live there)."""
from teegpu.server.linear_server import LinearServer, ServerConfig, serve

__all__ = ["LinearServer", "ServerConfig", "serve"]
