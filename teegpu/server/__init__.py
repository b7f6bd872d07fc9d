"""The untrusted GPU server. It imports the shared modules only (teegpu.config, options, protocol,
errors, ring, model, transport): never teegpu.tee, where secrets, pads and the KV cache live.
tests/test_server_imports_no_trusted_code.py holds it to that."""
from teegpu.server.linear_server import LinearServer, serve

__all__ = ["LinearServer", "serve"]
