"""The request bodies the API accepts, validated field by field into OpenAI-style errors.

Every field of OpenAI's CreateCompletionRequest and CreateChatCompletionRequest is served,
accepted as having no effect here (said in docs/api.md), or refused with 400 naming it unless
it holds its neutral value. Unknown fields are refused, as OpenAI does. `null` means the
field's default, as in OpenAI's schema.
"""
from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from teegpu.api.errors import ApiError
from teegpu.config import GenerationConfig
from teegpu.errors import ConfigError

# field -> the values under which a field this server does not implement is accepted
NEUTRAL = {"best_of": (None, 1), "suffix": (None, ""), "tools": (None, []), "tool_choice": (None, "none", "auto"),
           "parallel_tool_calls": (None, True, False), "response_format": (None, {"type": "text"}),
           "service_tier": (None, "auto", "default"), "store": (None, False), "modalities": (None, ["text"]),
           "reasoning_effort": (None,), "verbosity": (None,), "function_call": (None, "none", "auto"),
           "functions": (None, []), "audio": (None,), "prediction": (None,), "web_search_options": (None,),
           "moderation": (None,)}
WHY_REFUSED = {"response_format": "json_object and json_schema need constrained decoding, which this server "
                                  "does not do", "tools": "this server does not call tools",
               "best_of": "use n and pick by logprobs", "suffix": "insertion is not served"}
SIGNED_64 = 1 << 63


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # name, refusal, ... carry no text
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None

    @model_validator(mode="before")
    @classmethod
    def text_parts_only(cls, data):
        """Name the part this server does not serve, rather than pydantic's first union member's error."""
        parts = data.get("content") if isinstance(data, dict) else None
        for part in parts if isinstance(parts, list) else []:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                raise ValueError(f"content parts of type {kind!r} are not served here (only text)")
        return data

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool | None = False
    include_obfuscation: bool | None = None  # OpenAI's padding against length side channels: not added here


class CommonRequest(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="allow", strict=True)
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # not OpenAI's, accepted as an extra field (vLLM does the same)
    ignore_eos: bool = False  # vLLM's extra field: generate max_tokens whatever the model says
    cache_salt: str | None = None  # vLLM's extra field: only requests with the same salt share cached prefixes
    seed: int | None = Field(None, ge=-SIGNED_64, lt=SIGNED_64)
    stop: Union[str, list[str], None] = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=128)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # an end-user id for OpenAI's abuse monitoring: no effect here

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or not all(stops):
            raise ApiError(400, "stop takes up to 4 non-empty strings", param="stop")
        return tuple(stops)

    def check(self) -> None:
        """Refuse the fields not served here unless neutral, and combinations OpenAI refuses."""
        for name, value in (self.model_extra or {}).items():
            if name not in NEUTRAL:
                raise ApiError(400, f"Unrecognized request argument supplied: {name}", param=name)
            if value not in NEUTRAL[name] and not (name == "best_of" and value == self.choices):
                why = f": {WHY_REFUSED[name]}" if name in WHY_REFUSED else ""
                raise ApiError(400, f"{name}={value!r} is not supported by this server (only "
                               f"{' or '.join(repr(v) for v in NEUTRAL[name] if v is not None)}){why}", param=name)
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options is only allowed when stream is true", param="stream_options")

    @property
    def choices(self) -> int:
        return self.n or 1

    def token_bias(self) -> tuple[tuple[int, float], ...]:
        bias = []
        for key, value in (self.logit_bias or {}).items():
            if not key.lstrip("-").isdigit():
                raise ApiError(400, f"logit_bias keys are token ids, got {key!r}", param="logit_bias")
            if not -100 <= value <= 100:
                raise ApiError(400, f"logit_bias values lie in [-100, 100], got {value} for token {key}",
                               param="logit_bias")
            bias.append((int(key), float(value)))
        return tuple(bias)

    def generation(self, max_tokens: int, logprobs: int | None, choice: int = 0,
                   prompt_logprobs: bool = False) -> GenerationConfig:
        """Choice `choice`'s GenerationConfig (a seed gives choice i the seed + i, so that n seeded
        choices differ and repeat)."""
        seed = None if self.seed is None else (self.seed + choice + SIGNED_64) % (1 << 64) - SIGNED_64
        try:
            return GenerationConfig(
                max_new_tokens=max_tokens, temperature=1.0 if self.temperature is None else self.temperature,
                top_p=self.top_p or 1.0, top_k=self.top_k, seed=seed, stop=self.stop_strings(), logprobs=logprobs,
                stop_at_eos=not self.ignore_eos, presence_penalty=self.presence_penalty or 0.0,
                frequency_penalty=self.frequency_penalty or 0.0, logit_bias=self.token_bias(),
                prompt_logprobs=prompt_logprobs)
        except ConfigError as e:
            raise ApiError(400, str(e)) from e

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(CommonRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # accepted with no effect here (docs/api.md): OpenAI's stored completions and prompt caching hints
    metadata: dict[str, str] | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict | None = None

    def max_new_tokens(self, room: int) -> int:
        """max_completion_tokens, else max_tokens, else the rest of the context window."""
        return self.max_completion_tokens or self.max_tokens or max(1, room)

    def logprob_count(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def chat_messages(self) -> list[dict]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


Prompt = Union[str, list[int]]
PROMPT_FORMS = "a string, an array of strings, an array of token ids, or an array of arrays of token ids"


def _is_ids(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(type(t) is int for t in value)


class CompletionRequest(CommonRequest):
    prompt: object
    logprobs: int | None = Field(None, ge=0, le=5)
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default for completions; 0 with echo reads the prompt
    echo: bool | None = False

    def max_new_tokens(self, room: int) -> int:
        if self.max_tokens == 0 and not self.echo:
            raise ApiError(400, "max_tokens=0 generates nothing: it needs echo: true", param="max_tokens")
        return 16 if self.max_tokens is None else self.max_tokens

    def logprob_count(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[Prompt]:
        """The prompts, each a string or token ids, in OpenAI's four forms."""
        p = self.prompt
        if isinstance(p, str) or _is_ids(p):
            prompts = [p]
        elif isinstance(p, list) and p and (all(isinstance(x, str) for x in p) or all(_is_ids(x) for x in p)):
            prompts = list(p)
        else:
            raise ApiError(400, f"prompt must be {PROMPT_FORMS}", param="prompt")
        if any(x == "" for x in prompts):
            raise ApiError(400, "prompt must not be empty", param="prompt")
        return prompts


def _type_label(part) -> bool:
    """pydantic's name of a union member in an error's location (`str`, `list[TextPart]`), not a field."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "list", "dict") or "[" in part)


def parse(model: type[CommonRequest], body: object) -> CommonRequest:
    """A validated request, or ApiError(400) naming the first bad field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        req = model.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"] if not _type_label(p)) or "body"
        raise ApiError(400, f"{where}: {err['msg']}", param=where) from e
    req.check()
    return req
