"""OpenAI's response objects: completions, chunks, usage and logprobs in both endpoints' shapes."""
from __future__ import annotations

import secrets
import time
from dataclasses import dataclass


@dataclass(slots=True)
class Reply:
    """What every response object of one request shares."""

    kind: str  # "chat" or "text"
    model: str
    system_fingerprint: str
    id: str = ""
    created: int = 0

    def __post_init__(self):
        self.id = ("chatcmpl-" if self.kind == "chat" else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())

    def head(self, chunk: bool) -> dict:
        obj = {"chat": ("chat.completion", "chat.completion.chunk"), "text": ("text_completion", "text_completion")}
        return {"id": self.id, "object": obj[self.kind][chunk], "created": self.created, "model": self.model,
                "system_fingerprint": self.system_fingerprint}

    def choice(self, index: int, text: str, logprobs: list | None, finish_reason: str | None, chunk: bool,
               role: bool = False, offset: int = 0) -> dict:
        """Choice `index`; a completion's logprobs' text_offset counts from `offset` (a stream's text so far)."""
        lp = None if logprobs is None else (chat_logprobs(logprobs) if self.kind == "chat" else
                                            text_logprobs(logprobs, offset))
        if self.kind == "text":
            return {"index": index, "text": text, "logprobs": lp, "finish_reason": finish_reason}
        if chunk:
            delta = {"role": "assistant", "content": text} if role else ({"content": text} if text else {})
            return {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}
        return {"index": index, "message": {"role": "assistant", "content": text, "refusal": None}, "logprobs": lp,
                "finish_reason": finish_reason}

    def completion(self, choices: list[dict], usage: dict) -> dict:
        return {**self.head(False), "choices": choices, "usage": usage}

    def chunk(self, index: int, text: str, logprobs: list | None = None, finish_reason: str | None = None,
              role: bool = False, offset: int = 0) -> dict:
        return {**self.head(True), "choices": [self.choice(index, text, logprobs, finish_reason, True, role,
                                                           offset)]}

    def usage_chunk(self, usage: dict) -> dict:
        return {**self.head(True), "choices": [], "usage": usage}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def _bytes(token: str) -> list[int]:
    return list(token.encode("utf-8"))


def chat_logprobs(entries: list[dict]) -> dict:
    """Chat's shape: {"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]}."""
    return {"content": [{"token": e["token"], "logprob": e["logprob"], "bytes": _bytes(e["token"]),
                         "top_logprobs": [{"token": t["token"], "logprob": t["logprob"], "bytes": _bytes(t["token"])}
                                          for t in e["top"]]} for e in entries], "refusal": None}


def text_logprobs(entries: list[dict], offset: int = 0) -> dict:
    """Completions' shape: parallel lists of tokens, their logprobs, top alternatives and offsets into the
    text from `offset`. Each top_logprobs holds up to logprobs + 1 entries: the token itself is always
    there. An echoed prompt's first token has no logprob (null)."""
    offsets, pos = [], offset
    for e in entries:
        offsets.append(pos)
        pos += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [None if e["top"] is None else top_with_token(e) for e in entries],
            "text_offset": offsets}


def top_with_token(entry: dict) -> dict:
    top = {t["token"]: t["logprob"] for t in entry["top"]}
    top.setdefault(entry["token"], entry["logprob"])
    return top
