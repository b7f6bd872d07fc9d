"""n choices of one prompt (OpenAI's n > 1) prefill it once: the followers copy the leader's prompt
positions and sample their first token from the same logits, and then decode exactly as they would
alone. The prompt's own logprobs (echo) come from the same prefill, chunked or not."""
import pytest
import torch

from teegpu.config import GenerationConfig, SchedulerConfig
from teegpu.tee.scheduler import Scheduler


@pytest.fixture(scope="module")
def engine(smollm2):
    from teegpu.tee.engine import Engine
    from teegpu.tee.linears import LocalLinears

    weights, tok = smollm2
    return Engine(weights, tok, LocalLinears(weights))


def run(scheduler: Scheduler) -> list[int]:
    """Step until idle; the rows of every step."""
    rows = []
    scheduler.on_step = lambda seconds, n: rows.append(n)
    while scheduler.step():
        pass
    return rows


def sampled(seed: int) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=6, temperature=0.9, seed=seed, stop_at_eos=False)


def test_followers_decode_as_alone_after_one_prefill(engine):
    ids = engine.encode("Tell me about the sea.", chat=True)
    scheduler = Scheduler(engine, SchedulerConfig(max_batch=4, prefill_chunk=512))
    leader = scheduler.submit(ids, sampled(1))
    followers = [scheduler.submit(ids, sampled(seed), leader=leader) for seed in (2, 3)]
    rows = run(scheduler)
    assert rows[0] == len(ids) and rows[1:] == [3] * 5  # one prefill, then the three decode together
    for seq, seed in zip([leader, *followers], (1, 2, 3)):
        assert seq.out == engine.generate(ids, sampled(seed)).token_ids, seed
    assert len({tuple(s.out) for s in [leader, *followers]}) > 1  # different seeds, different choices
    assert scheduler.kv.used == 0


def test_a_follower_admitted_late_forks_from_the_running_leader(engine):
    ids = engine.encode("Name a river.", chat=True)
    other = engine.encode("Hi", chat=True)
    scheduler = Scheduler(engine, SchedulerConfig(max_batch=2, prefill_chunk=512))
    scheduler.submit(other, GenerationConfig(max_new_tokens=1, stop_at_eos=False))
    leader = scheduler.submit(ids, sampled(1))
    follower = scheduler.submit(ids, sampled(2), leader=leader)
    rows = run(scheduler)
    assert sum(rows) == len(other) + len(ids) + 5 + 5  # the follower never prefilled
    assert follower.out == engine.generate(ids, sampled(2)).token_ids


def test_a_follower_whose_leader_ended_prefills_by_itself(engine):
    ids = engine.encode("Name a mountain.", chat=True)
    scheduler = Scheduler(engine, SchedulerConfig(max_batch=1, prefill_chunk=512))
    leader = scheduler.submit(ids, sampled(1))
    follower = scheduler.submit(ids, sampled(2), leader=leader)
    run(scheduler)
    assert leader.done.is_set() and follower.out == engine.generate(ids, sampled(2)).token_ids


@pytest.mark.parametrize("chunk", [512, 5])
def test_prompt_logprobs_are_the_models(engine, chunk):
    ids = engine.encode("The quick brown fox jumps over the lazy dog because")
    scheduler = Scheduler(engine, SchedulerConfig(max_batch=2, prefill_chunk=chunk))
    gen = GenerationConfig(max_new_tokens=0, logprobs=2, prompt_logprobs=True)
    seq = scheduler.submit(ids, gen)
    follower = scheduler.submit(ids, gen, leader=seq)
    run(scheduler)
    assert seq.finish_reason == "length" and seq.out == [] and seq.completion_tokens == 0
    entries = seq.prompt_logprobs
    assert [e["id"] for e in entries] == ids and entries[0]["logprob"] is None
    want = torch.log_softmax(engine.forward(ids, 0, engine.new_cache(len(ids)), all_logits=True), -1)
    for i, e in enumerate(entries[1:], 1):
        assert e["logprob"] == pytest.approx(float(want[i - 1, ids[i]]), abs=1e-3)
        assert [t["id"] for t in e["top"]] == want[i - 1].topk(2).indices.tolist()
    assert follower.prompt_logprobs == entries
