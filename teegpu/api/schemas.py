"""The request bodies the API accepts, validated field by field into OpenAI-style errors.

Unknown fields are refused with a message naming them (as OpenAI does). Fields of the
OpenAI API that teegpu does not implement are accepted at their neutral value (n=1,
penalties 0, ...) and refused otherwise, again naming the field.
"""
from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from teegpu.api.errors import ApiError
from teegpu.config import GenerationConfig
from teegpu.errors import ConfigError

# field -> the neutral values under which an unimplemented OpenAI field is accepted
NEUTRAL = {"n": (None, 1), "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "logit_bias": (None, {}),
           "best_of": (None, 1), "echo": (None, False), "suffix": (None, ""), "tools": (None, []),
           "tool_choice": (None, "none", "auto"), "parallel_tool_calls": (None, True, False),
           "response_format": (None, {"type": "text"}), "service_tier": (None, "auto", "default"),
           "store": (None, False), "metadata": (None, {}), "modalities": (None, ["text"]),
           "reasoning_effort": (None,), "function_call": (None, "none", "auto"), "functions": (None, [])}


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # name, refusal, ... carry no text
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class CommonRequest(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="allow", strict=True)
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # not OpenAI's, accepted as an extra field (vLLM does the same)
    ignore_eos: bool = False  # vLLM's extra field: generate max_tokens whatever the model says
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted, ignored

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or not all(stops):
            raise ApiError(400, "stop takes up to 4 non-empty strings", param="stop")
        return tuple(stops)

    def check_extra_fields(self) -> None:
        for name, value in (self.model_extra or {}).items():
            if name not in NEUTRAL:
                raise ApiError(400, f"Unrecognized request argument supplied: {name}", param=name)
            if value not in NEUTRAL[name]:
                raise ApiError(400, f"{name}={value!r} is not supported by this server (only "
                               f"{' or '.join(repr(v) for v in NEUTRAL[name] if v is not None)})", param=name)

    def generation(self, max_tokens: int | None, default_max: int, logprobs: int | None) -> GenerationConfig:
        """The sequence's GenerationConfig; max_tokens defaults to the rest of the context window."""
        self.check_extra_fields()
        try:
            return GenerationConfig(max_new_tokens=max_tokens or max(1, default_max), temperature=self.temperature,
                                    top_p=self.top_p, top_k=self.top_k, seed=self.seed, stop=self.stop_strings(),
                                    logprobs=logprobs, stop_at_eos=not self.ignore_eos)
        except ConfigError as e:
            raise ApiError(400, str(e)) from e

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(CommonRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprob_count(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def chat_messages(self) -> list[dict]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(CommonRequest):
    prompt: str = Field(min_length=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions

    def max_new_tokens(self) -> int | None:
        return self.max_tokens

    def logprob_count(self) -> int | None:
        return self.logprobs


def parse(model: type[CommonRequest], body: object) -> CommonRequest:
    """A validated request, or ApiError(400) naming the first bad field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "body"
        raise ApiError(400, f"{where}: {err['msg']}", param=where) from e
