"""Next-token choice: greedy, or temperature with top-k and top-p; a drafted token kept or replaced
so that the choice is distributed as without drafting."""
from __future__ import annotations

import torch


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
           generator: torch.Generator | None) -> int:
    """logits (vocab,) -> token id. temperature 0 means greedy."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    return int(torch.multinomial(distribution(logits, temperature, top_k, top_p), 1, generator=generator))


def check_draft(probs: torch.Tensor, draft: int, generator: torch.Generator | None) -> int:
    """Speculative sampling with a drafter that proposes one token for sure (prompt lookup): keep
    the draft with probability p(draft), else sample from p without it. The token returned is
    distributed exactly as p (Leviathan et al., 2023, with q a point mass)."""
    if float(torch.rand((), generator=generator)) < float(probs[draft]):
        return draft
    rest = probs.clone()
    rest[draft] = 0
    if float(rest.sum()) <= 0:
        return draft
    return int(torch.multinomial(rest, 1, generator=generator))


def distribution(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The probabilities sampling draws from: temperature, then top-k, then top-p."""
    logits = logits.float() / temperature
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs >= top_p  # keeps the token that crosses top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return torch.softmax(logits, dim=-1)


def token_logprobs(logits: torch.Tensor, token: int, top: int, token_text) -> dict:
    """The chosen token's log-probability under the model (before temperature, as OpenAI reports it)
    and the `top` most likely alternatives: {"token", "id", "logprob", "top": [...]}."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    entry = {"id": token, "token": token_text(token), "logprob": float(lp[token]), "top": []}
    if top:
        values, ids = torch.topk(lp, top)
        entry["top"] = [{"id": i, "token": token_text(i), "logprob": v} for v, i in zip(values.tolist(), ids.tolist())]
    return entry


def adjust(logits: torch.Tensor, bias: tuple[tuple[int, float], ...], presence: float, frequency: float,
           generated: list[int]) -> torch.Tensor:
    """OpenAI's logit_bias and penalties: logit[j] + bias[j] - frequency * count[j] - presence * (count[j] > 0),
    counted over the tokens generated so far. The logits themselves when nothing applies."""
    penalise = (presence or frequency) and generated
    if not bias and not penalise:
        return logits
    logits = logits.float().clone()
    if penalise:
        ids, counts = torch.unique(torch.tensor(generated), return_counts=True)
        logits[ids] -= frequency * counts.float() + presence
    if bias:
        ids, values = zip(*bias)
        logits[list(ids)] += torch.tensor(values)
    return logits
