"""Speculative decoding by prompt lookup changes how many tokens a step gives, not which: greedy
outputs equal those without it (batched, with stop strings, logprobs and max_tokens), a drafted
token is kept or replaced so that sampling keeps the model's distribution, and on text that
repeats its prompt a step gives several tokens for one set of round trips."""
import pytest
import torch

from teegpu.config import GenerationConfig, SchedulerConfig, SpeculativeConfig
from teegpu.tee.sampling import check_draft
from teegpu.tee.scheduler import Scheduler
from teegpu.tee.speculation import prompt_lookup

NGRAM = SpeculativeConfig(speculative="ngram", num_speculative_tokens=4)
PARAGRAPH = ("The river rises in the hills above the town, runs past the old mill and the school, and "
             "reaches the sea after a journey of forty miles through fields and woods.")
COPY = [{"role": "user", "content": f"Repeat this sentence exactly, word for word: {PARAGRAPH}"}]


@pytest.fixture(scope="module")
def engine(smollm2):
    from teegpu.tee.engine import Engine
    from teegpu.tee.linears import LocalLinears

    weights, tok = smollm2
    return Engine(weights, tok, LocalLinears(weights))


def test_prompt_lookup_takes_the_longest_most_recent_match():
    assert prompt_lookup([1, 2, 3, 9, 1, 2, 3, 7, 5, 2, 3], 1, 3, 2) == [7, 5]  # "2 3" last seen before 7
    assert prompt_lookup([4, 5, 6, 4, 5], 2, 3, 3) == [6, 4, 5]
    assert prompt_lookup([1, 2, 3, 4], 1, 2, 3) == [] and prompt_lookup([1, 2, 1], 1, 2, 0) == []


def test_a_checked_draft_keeps_the_distribution():
    """Chi-square over 5 tokens, 40,000 draws each with the draft a likely and an unlikely token."""
    probs = torch.softmax(torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0]), -1)
    rng = torch.Generator().manual_seed(3)
    for draft in (3, 2):
        counts = torch.zeros(5)
        for _ in range(40_000):
            counts[check_draft(probs, draft, rng)] += 1
        expected = probs * counts.sum()
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 18.47, (draft, chi2)  # the 0.999 quantile of chi-square with 4 degrees of freedom


def run(engine, prompts, gen, speculative=None, max_batch=4):
    scheduler = Scheduler(engine, SchedulerConfig(max_batch=max_batch, prefix_cache=False), speculative)
    seqs = [scheduler.submit(ids, gen) for ids in prompts]
    steps = 0
    while scheduler.step():
        steps += 1
    return seqs, steps, scheduler.speculation


def test_greedy_copying_is_the_same_in_fewer_steps(engine):
    ids = engine.encode(COPY, chat=True)
    gen = GenerationConfig(max_new_tokens=40, stop_at_eos=False, logprobs=1)
    (plain,), plain_steps, _ = run(engine, [ids], gen)
    (fast,), fast_steps, stats = run(engine, [ids], gen, NGRAM)
    assert fast.out == plain.out and fast.text == plain.text
    assert [e["id"] for e in fast.logprobs] == fast.out
    assert [e["logprob"] for e in fast.logprobs] == pytest.approx([e["logprob"] for e in plain.logprobs], abs=1e-3)
    assert stats.accepted > 0 and stats.tokens / stats.steps > 1.5 and fast_steps < plain_steps


def test_batched_with_stops_and_lengths(engine):
    prompts = [engine.encode(COPY, chat=True), engine.encode("Count from one to twenty: one, two, three,"),
               engine.encode([{"role": "user", "content": "Write a short poem about autumn."}], chat=True)]
    for gen in (GenerationConfig(max_new_tokens=23, stop_at_eos=False),
                GenerationConfig(max_new_tokens=30, stop=("mill", "eleven"))):
        plain, _, _ = run(engine, prompts, gen)
        fast, _, _ = run(engine, prompts, gen, NGRAM)
        assert [s.out for s in fast] == [s.out for s in plain]
        assert [(s.text, s.finish_reason) for s in fast] == [(s.text, s.finish_reason) for s in plain]


def test_seeded_sampling_repeats_and_uses_drafts(engine):
    ids = engine.encode(COPY, chat=True)
    gen = GenerationConfig(max_new_tokens=30, temperature=0.7, seed=5, stop_at_eos=False)
    (a,), _, stats = run(engine, [ids], gen, NGRAM)
    (b,), _, _ = run(engine, [ids], gen, NGRAM)
    assert a.out == b.out and stats.accepted > 0


@pytest.mark.parametrize("privacy", ["plain", "otp"])
def test_the_split_pays_fewer_round_trips(privacy, smollm2, smollm2_servers):
    from teegpu.options import rpcs_per_forward
    from teegpu.tee.engine import Engine

    weights, tok = smollm2
    tokens = 32 if privacy == "plain" else 16
    with Engine.connect(weights, tok, smollm2_servers("ipc", privacy=privacy), data_plane="shm",
                        privacy=privacy) as engine:
        gen = GenerationConfig(max_new_tokens=tokens, stop_at_eos=False)
        plain = engine.generate(COPY, gen, chat=True)
        fast = engine.generate(COPY, gen, chat=True, speculative=NGRAM)
    assert fast.token_ids == plain.token_ids
    assert plain.rpc["calls"] == rpcs_per_forward(30) * tokens
    assert fast.rpc["calls"] < 0.7 * plain.rpc["calls"] and fast.speculation["tokens_per_step"] > 1.5


def test_the_api_reports_acceptance(openai_api):
    import httpx

    from conftest import API_KEY, SERVED_MODEL

    body = {"model": SERVED_MODEL, "messages": COPY, "max_tokens": 24, "temperature": 0}
    r = httpx.post(openai_api.url + "/v1/chat/completions", json=body, timeout=120,
                   headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200 and "river" in r.json()["choices"][0]["message"]["content"]
    metrics = httpx.get(openai_api.url + "/metrics").text
    rate = next(line for line in metrics.splitlines() if line.startswith("teegpu_speculative_acceptance_rate "))
    assert float(rate.split()[-1]) > 0 and 'teegpu_speculative_tokens{kind="accepted"}' in metrics
