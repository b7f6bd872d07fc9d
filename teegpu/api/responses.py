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

    def choice(self, text: str, logprobs: list | None, finish_reason: str | None, chunk: bool,
               role: bool = False) -> dict:
        lp = None if logprobs is None else (chat_logprobs(logprobs) if self.kind == "chat" else text_logprobs(logprobs))
        if self.kind == "text":
            return {"index": 0, "text": text, "logprobs": lp, "finish_reason": finish_reason}
        if chunk:
            delta = {"role": "assistant", "content": text} if role else ({"content": text} if text else {})
            return {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}
        return {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None}, "logprobs": lp,
                "finish_reason": finish_reason}

    def completion(self, text: str, logprobs: list | None, finish_reason: str, usage: dict) -> dict:
        return {**self.head(False), "choices": [self.choice(text, logprobs, finish_reason, False)], "usage": usage}

    def chunk(self, text: str, logprobs: list | None = None, finish_reason: str | None = None,
              role: bool = False) -> dict:
        return {**self.head(True), "choices": [self.choice(text, logprobs, finish_reason, True, role)]}

    def usage_chunk(self, usage: dict) -> dict:
        return {**self.head(True), "choices": [], "usage": usage}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _bytes(token: str) -> list[int]:
    return list(token.encode("utf-8"))


def chat_logprobs(entries: list[dict]) -> dict:
    """Chat's shape: {"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]}."""
    return {"content": [{"token": e["token"], "logprob": e["logprob"], "bytes": _bytes(e["token"]),
                         "top_logprobs": [{"token": t["token"], "logprob": t["logprob"], "bytes": _bytes(t["token"])}
                                          for t in e["top"]]} for e in entries], "refusal": None}


def text_logprobs(entries: list[dict]) -> dict:
    """Completions' shape: parallel lists of tokens, their logprobs, top alternatives and offsets."""
    offsets, pos = [], 0
    for e in entries:
        offsets.append(pos)
        pos += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top"]} for e in entries], "text_offset": offsets}
