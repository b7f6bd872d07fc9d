"""Speculative decoding by prompt lookup (vLLM's `ngram`): no draft model, no extra memory.

When the text being generated repeats what came before (a summary quoting its document, an
edited paragraph, code that echoes its definitions), the tokens that followed the last n-gram's
earlier occurrence are a good guess for what comes next. A decode step then carries a
sequence's last token plus the guesses as rows of the same batched forward pass: one set of
4L+1 round trips checks them all, and every guess the model agrees with is a token gained.
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass


def prompt_lookup(context: list[int], n_min: int, n_max: int, k: int) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of the context's last n-gram,
    the longest n in [n_min, n_max] that occurs; [] when none does. (Searched as bytes: a step of
    a 2,000-token context costs microseconds, not a Python loop.)"""
    if k <= 0 or len(context) < 2:
        return []
    data = array("q", context).tobytes()
    width = 8
    for n in range(min(n_max, len(context) - 1), n_min - 1, -1):
        tail, limit = data[-width * n:], len(data) - width  # an earlier occurrence ends before the last token
        while (at := data.rfind(tail, 0, limit)) >= 0:
            if at % width == 0:
                start = at // width + n
                return context[start:start + k]
            limit = at + len(tail) - 1  # a match across token boundaries: look further back
    return []


@dataclass(slots=True)
class SpeculationStats:
    steps: int = 0  # decode steps of a sequence that carried drafts
    drafted: int = 0
    accepted: int = 0
    tokens: int = 0  # tokens those steps produced (accepted drafts and one more each)

    def as_dict(self) -> dict:
        return {"steps": self.steps, "drafted": self.drafted, "accepted": self.accepted,
                "acceptance_rate": self.accepted / max(self.drafted, 1),
                "tokens_per_step": self.tokens / max(self.steps, 1)}
