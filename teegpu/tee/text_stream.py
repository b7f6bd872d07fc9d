"""From growing token lists to text deltas, honouring stop strings."""
from __future__ import annotations

from typing import Callable


class TextStream:
    """Turns a sequence's growing token list into text deltas. Holds back a split UTF-8
    character and any tail that may be the start of a stop string; cuts the text before the
    first stop string. The concatenated deltas are `text`, streamed or not."""

    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...] = ()):
        self.decode, self.stop, self.text = decode, stop, ""

    def push(self, ids: list[int], final: bool = False) -> tuple[str, bool]:
        """(new text, whether a stop string was reached)."""
        text = self.decode(ids)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, final = text[:cut], True
        elif not final:
            if text.endswith("\ufffd"):
                return "", False
            text = text[:len(text) - self._held_back(text)]
        if len(text) <= len(self.text) or not text.startswith(self.text):
            return "", cut >= 0
        delta, self.text = text[len(self.text):], text
        return delta, cut >= 0

    def finish(self, ids: list[int]) -> str:
        """The text held back so far (at the end of a sequence)."""
        return self.push(ids, final=True)[0]

    def _held_back(self, text: str) -> int:
        """Length of the longest tail of text that begins some stop string."""
        return max((k for s in self.stop for k in range(len(s) - 1, 0, -1) if text.endswith(s[:k])), default=0)
