"""Typed errors. Both sides import this module; it holds no secrets."""


class TeegpuError(Exception):
    """Base class of every error teegpu raises on purpose."""


class ModelLoadError(TeegpuError):
    """The model path is missing, of another architecture, or corrupt."""


class ConfigError(TeegpuError, ValueError):
    """A configuration value is out of range or inconsistent."""


class ContextLengthError(TeegpuError, ValueError):
    """The prompt (plus the tokens asked for) does not fit the context window."""


class Overloaded(TeegpuError):
    """Too many requests wait already: try again later (HTTP 429)."""


class ProtocolError(TeegpuError):
    """A message broke the wire protocol; `code` is a protocol.ErrorCode."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


class ServerError(ProtocolError):
    """The server answered a request with an error reply."""

    def __str__(self) -> str:
        from teegpu.protocol import ErrorCode

        return f"server error {ErrorCode(self.code).name}: {self.args[0]}"


class ServerUnavailable(TeegpuError):
    """No reply arrived before the request's deadline (server gone or stalled)."""


class HandshakeError(TeegpuError):
    """The server speaks another protocol version or serves other weights."""


class IntegrityError(TeegpuError):
    """A result from the server failed verification: generation stops, nothing computed from it is emitted."""

    def __init__(self, op: str, layer: int, reason: str):
        super().__init__(f"{op} layer {layer}: {reason}")
        self.op, self.layer, self.reason = op, layer, reason


class AttestationError(TeegpuError):
    """A server's TEE evidence failed a check (quote, TCB status, measurement, key or model binding)."""
