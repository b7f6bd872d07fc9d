"""OpenAI's error object for every failure: {"error": {"message", "type", "param", "code"}}.

Never a traceback, never FastAPI's default 422: the exception handlers of the app map
everything here, and the engine's typed errors to their HTTP status.
"""
from __future__ import annotations

from fastapi.responses import JSONResponse

from teegpu.errors import (
    ConfigError, ContextLengthError, HandshakeError, IntegrityError, Overloaded, ProtocolError, ServerUnavailable,
    TeegpuError,
)

TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
         405: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error", 429: "rate_limit_error",
         500: "server_error", 502: "server_error", 503: "server_error"}


class ApiError(Exception):
    """An error answered to the client with its status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or TYPES.get(status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def from_engine(e: BaseException, prompt_param: str | None = None) -> ApiError:
    """The HTTP face of an error raised by the engine, the scheduler or the GPU server (`prompt_param`:
    the request field a prompt's errors name, "messages" or "prompt")."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, ContextLengthError):
        return ApiError(400, str(e), param=prompt_param or "messages", code="context_length_exceeded")
    if isinstance(e, ConfigError):
        return ApiError(400, str(e), param=prompt_param)
    if isinstance(e, Overloaded):
        return ApiError(429, str(e), code="queue_full")
    if isinstance(e, IntegrityError):
        return ApiError(500, f"the GPU server's result failed verification: {e}", type="integrity_error",
                        code="integrity_check_failed")
    if isinstance(e, ServerUnavailable):
        return ApiError(503, f"the GPU server is unreachable: {e}", code="gpu_server_unavailable")
    if isinstance(e, (ProtocolError, HandshakeError)):
        return ApiError(503, f"the GPU server failed: {e}", code="gpu_server_error")
    if isinstance(e, TeegpuError):
        return ApiError(500, str(e))
    return ApiError(500, f"internal error ({type(e).__name__})")
