"""Continuous batching: sequences that join and leave at different steps, with different
lengths and settings, get what they would get alone (fp32 logits within 1e-3, the same greedy
tokens), one step costs 4L+1 RPCs however many share it, and a cancelled sequence frees its
place and its KV cache at the next step without disturbing the others."""
import pytest
import torch

from conftest import connect_engine
from teegpu.config import GenerationConfig, SchedulerConfig
from teegpu.errors import ContextLengthError, Overloaded
from teegpu.options import rpcs_per_forward
from teegpu.tee.scheduler import Scheduler

PROMPTS = [("The capital of France is", 12), ("Write a haiku about the sea.", 20), ("def fibonacci(n):", 7),
           ("List three colours:", 16)]


def solo_logits(engine, ids: list[int], new: list[int]) -> torch.Tensor:
    """Logits of every generated position, computed for this sequence alone."""
    seq = ids + new
    return engine.forward(seq, 0, engine.new_cache(len(seq)), all_logits=True)[len(ids) - 1:len(seq) - 1]


def run_staggered(engine, prompts, join_every: int = 3, chunk: int = 8):
    """Submit one prompt every `join_every` steps, small prefill chunks; step until all are done.
    Returns the sequences and the logits each sampled token came from."""
    scheduler = Scheduler(engine, SchedulerConfig(max_batch=8, prefill_chunk=chunk))
    logits_seen: dict[int, list] = {}
    original = scheduler._advance

    def spy(seq, token, logits):
        logits_seen.setdefault(seq.id, []).append(logits.clone())
        original(seq, token, logits)

    scheduler._advance = spy
    pending, seqs, step = list(prompts), [], 0
    while pending or any(not s.done.is_set() for s in seqs):
        if pending and step % join_every == 0:
            ids, n = pending.pop(0)
            seqs.append(scheduler.submit(ids, GenerationConfig(max_new_tokens=n, stop_at_eos=False)))
        scheduler.step()
        step += 1
    return seqs, logits_seen, scheduler


# fp32: the 1e-3. otp quantizes each row to 16 bits: a float difference of 1e-6 from
# chunked prefill can move a value across a rounding step, which shows as up to ~0.02 in a logit
TOLERANCE = {"local": 1e-3, "shm": 1e-3, "otp-verify": 0.05}


@pytest.mark.parametrize("variant", ["local", "shm", "otp-verify"])
def test_staggered_batch_equals_solo(variant, smollm2, smollm2_servers):
    from teegpu.tee.engine import Engine
    from teegpu.tee.linears import LocalLinears

    weights, tok = smollm2
    if variant == "local":
        engine = Engine(weights, tok, LocalLinears(weights))
    elif variant == "shm":
        engine = connect_engine(weights, tok, smollm2_servers, "shm")
    else:  # every row padded with its own pad, every product verified
        engine = connect_engine(weights, tok, smollm2_servers, "shm", privacy="otp", verify=True, mask_pool_rows=16)
    short = variant == "otp-verify"  # every otp row's pad made online: fewer tokens show the same
    prompts = [(engine.encode(p, chat=True), n // 3 if short else n) for p, n in PROMPTS]
    seqs, seen, scheduler = run_staggered(engine, prompts)
    for seq, (ids, n) in zip(seqs, prompts):
        assert seq.finish_reason == "length" and len(seq.out) == n
        got = torch.stack(seen[seq.id])
        want = solo_logits(engine, ids, seq.out)
        assert (got - want).abs().max() < TOLERANCE[variant], seq.id
        assert got.argmax(-1).tolist() == want.argmax(-1).tolist() == seq.out
    assert scheduler.kv.used == 0 and not scheduler.running
    engine.close()


def test_a_step_costs_one_forward_of_rpcs_whatever_the_batch(smollm2, smollm2_servers):
    weights, tok = smollm2
    engine = connect_engine(weights, tok, smollm2_servers, "ipc")
    scheduler = Scheduler(engine, SchedulerConfig(max_batch=4, prefill_chunk=512))
    for p, _ in PROMPTS:
        scheduler.submit(engine.encode(p), GenerationConfig(max_new_tokens=5, stop_at_eos=False))
    before = engine.client.stats.calls
    steps = 0
    while scheduler.step():
        steps += 1
    assert steps == 5  # one prefill step for all four, then four decode steps
    assert engine.client.stats.calls - before == steps * rpcs_per_forward(weights.config.num_layers)
    engine.close()


def test_cancelled_sequence_frees_its_place_and_cache(smollm2):
    from teegpu.tee.engine import Engine
    from teegpu.tee.linears import LocalLinears

    weights, tok = smollm2
    engine = Engine(weights, tok, LocalLinears(weights))
    scheduler = Scheduler(engine, SchedulerConfig(max_batch=2, prefill_chunk=64))
    gen = GenerationConfig(max_new_tokens=10, stop_at_eos=False)
    ids = [engine.encode(p) for p, _ in PROMPTS[:3]]
    a, b, c = (scheduler.submit(i, gen) for i in ids)
    scheduler.step()
    scheduler.step()
    assert {s.id for s in scheduler.running} == {a.id, b.id} and c in scheduler.waiting
    scheduler.cancel(a)
    scheduler.step()
    assert a.done.is_set() and a.finish_reason == "cancelled" and a.cache is None
    assert {s.id for s in scheduler.running} == {b.id, c.id}  # the freed place went to the waiting one
    while scheduler.step():
        pass
    alone = engine.generate(ids[1], gen)
    assert b.out == alone.token_ids and scheduler.kv.used == 0


def test_sampling_settings_are_per_sequence(smollm2):
    """A seeded sampled sequence gives the same tokens beside a greedy one as alone."""
    from teegpu.tee.engine import Engine
    from teegpu.tee.linears import LocalLinears

    weights, tok = smollm2
    engine = Engine(weights, tok, LocalLinears(weights))
    ids = engine.encode("Tell me a story.", chat=True)
    sampled = GenerationConfig(max_new_tokens=12, temperature=0.9, top_p=0.9, top_k=40, seed=7, stop_at_eos=False)
    alone = engine.generate(ids, sampled).token_ids
    scheduler = Scheduler(engine)
    s = scheduler.submit(ids, sampled)
    g = scheduler.submit(engine.encode("Count to ten."), GenerationConfig(max_new_tokens=12, stop_at_eos=False))
    while scheduler.step():
        pass
    assert s.out == alone and g.out == engine.generate(engine.encode("Count to ten."), g.gen).token_ids


def test_admission_limits(smollm2):
    from teegpu.tee.engine import Engine
    from teegpu.tee.linears import LocalLinears

    weights, tok = smollm2
    engine = Engine(weights, tok, LocalLinears(weights))
    scheduler = Scheduler(engine, SchedulerConfig(max_batch=1, max_queue=1, kv_cache_mb=64))
    gen = GenerationConfig(max_new_tokens=4)
    scheduler.submit([1, 2, 3], gen)
    scheduler.submit([1, 2, 3], gen)  # waits: one place, one in the queue
    with pytest.raises(Overloaded):
        scheduler.submit([1, 2, 3], gen)
    with pytest.raises(ContextLengthError, match="context window"):
        scheduler.submit([1] * 10, GenerationConfig(max_new_tokens=weights.config.max_position_embeddings))
    with pytest.raises(Exception, match="KV budget"):  # 2000 positions of fp32 KV > 64 MB
        scheduler.submit([1] * 10, GenerationConfig(max_new_tokens=2000))
