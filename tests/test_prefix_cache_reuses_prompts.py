"""A request that starts as an earlier one did prefills only the rest: the earlier request's KV
blocks are copied from the prefix cache, and the tokens are those without the cache. Blocks are
keyed by everything before them and a salt (no hit across salts), live in the KV budget (running
sequences win, least recently used blocks go first), and a cancelled request leaves only blocks
it computed in full. Through the API: usage's cached_tokens and /metrics' hit rate."""
import httpx
import pytest
import torch

from conftest import API_KEY, SERVED_MODEL
from teegpu.config import GenerationConfig, SchedulerConfig
from teegpu.tee.prefix_cache import PrefixCache
from teegpu.tee.scheduler import Scheduler

GREEDY = GenerationConfig(max_new_tokens=8, stop_at_eos=False)
TURN_1 = [{"role": "user", "content": "Name three rivers of Europe and say one thing about each."}]


@pytest.fixture(scope="module")
def engine(smollm2):
    from teegpu.tee.engine import Engine
    from teegpu.tee.linears import LocalLinears

    weights, tok = smollm2
    return Engine(weights, tok, LocalLinears(weights))


def run(scheduler: Scheduler, ids: list[int], gen=GREEDY, salt: bytes = b""):
    seq = scheduler.submit(ids, gen, salt=salt)
    while scheduler.step():
        pass
    return seq


def fresh(engine, **kw) -> Scheduler:
    engine._prefix_cache = None  # each test starts from an empty cache
    return Scheduler(engine, SchedulerConfig(prefix_block_tokens=16, **kw))


def test_the_next_chat_turn_prefills_only_its_new_tokens(engine):
    scheduler = fresh(engine)
    first = run(scheduler, engine.encode(TURN_1, chat=True))
    turn_2 = TURN_1 + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And in Asia?"}]
    ids = engine.encode(turn_2, chat=True)
    rows = []
    scheduler.on_step = lambda seconds, n: rows.append(n)
    second = run(scheduler, ids)
    assert second.cached_tokens >= len(engine.encode(TURN_1, chat=True)) - 16  # all full blocks of turn 1
    assert second.cached_tokens % 16 == 0 and rows[0] == len(ids) - second.cached_tokens
    without = run(Scheduler(engine, SchedulerConfig(prefix_cache=False)), ids)
    assert without.cached_tokens == 0 and second.out == without.out


def test_a_different_start_misses_and_keys_cover_the_whole_prefix(engine):
    cache = PrefixCache(4)
    a, b = [1, 2, 3, 4, 5, 6, 7, 8, 9], [9, 2, 3, 4, 5, 6, 7, 8, 9]  # the same second block after another first
    assert cache.keys(a, b"", 2)[1] != cache.keys(b, b"", 2)[1]
    scheduler = fresh(engine)
    run(scheduler, engine.encode("The history of the city of Rome begins with a small village on a hill."))
    assert run(scheduler, engine.encode("A recipe for bread: flour, water, salt and yeast, mixed and left to "
                                        "rise overnight.")).cached_tokens == 0


def test_no_hit_across_salts(engine):
    scheduler = fresh(engine)
    ids = engine.encode(TURN_1, chat=True)
    run(scheduler, ids, salt=b"alice")
    assert run(scheduler, ids, salt=b"bob").cached_tokens == 0
    assert run(scheduler, ids, salt=b"alice").cached_tokens > 0


def test_blocks_live_in_the_budget_and_running_sequences_win(engine):
    per_block = engine.cache_bytes(16)
    scheduler = fresh(engine, kv_cache_mb=4)  # room for a few blocks besides one running sequence
    prompts = [engine.encode(f"Tell me about the number {i} and why it matters to people in their lives.") for i in range(6)]
    for ids in prompts:
        seq = scheduler.submit(ids, GenerationConfig(max_new_tokens=2, stop_at_eos=False))
        while scheduler.step():
            assert scheduler.kv.used + scheduler.prefix.bytes <= scheduler.kv.budget
        assert seq.finish_reason == "length"
    assert scheduler.prefix.stats.evicted_blocks > 0 and scheduler.prefix.bytes >= per_block
    big = scheduler.submit(engine.encode("x " * 50), GenerationConfig(max_new_tokens=2, stop_at_eos=False))
    scheduler.step()  # admitting it evicts cached blocks: a running sequence wins
    assert big in scheduler.running and scheduler.kv.used + scheduler.prefix.bytes <= scheduler.kv.budget
    while scheduler.step():
        pass


def test_a_cancelled_request_leaves_only_blocks_it_computed(engine):
    ids = engine.encode("word " * 60)
    scheduler = fresh(engine, prefill_chunk=24)
    seq = scheduler.submit(ids, GREEDY)
    scheduler.step()  # 24 of the prompt's positions computed: one full block of 16
    scheduler.cancel(seq)
    scheduler.step()
    assert seq.finish_reason == "cancelled" and scheduler.prefix.stats.blocks == 1
    again = run(scheduler, ids)
    assert again.cached_tokens == 16
    assert again.out == run(Scheduler(engine, SchedulerConfig(prefix_cache=False)), ids).out


def test_engine_generate_reuses_the_previous_call(engine):
    engine._prefix_cache = None
    ids = engine.encode(TURN_1, chat=True)
    first = engine.generate(ids, GREEDY)
    again = engine.generate(ids, GREEDY)
    assert engine._prefix_cache.stats.hit_tokens > 0 and again.token_ids == first.token_ids


def test_the_api_reports_cached_tokens(openai_api):
    auth = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": SERVED_MODEL, "max_tokens": 2, "temperature": 0,
            "messages": [{"role": "user", "content": "Summarise: " + "the river runs to the sea. " * 20}]}
    first, second = (httpx.post(openai_api.url + "/v1/chat/completions", json=body, headers=auth, timeout=60).json()
                     for _ in range(2))
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0 < cached < second["usage"]["prompt_tokens"]
    assert second["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
    other = httpx.post(openai_api.url + "/v1/chat/completions", json={**body, "cache_salt": "tenant-2"},
                       headers=auth, timeout=60).json()
    assert other["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # another salt: no hit
    metrics = httpx.get(openai_api.url + "/metrics").text
    rate = next(line for line in metrics.splitlines() if line.startswith("teegpu_prefix_cache_hit_rate "))
    assert 0 < float(rate.split()[-1]) < 1
    assert 'teegpu_prefix_cache_tokens{kind="hit"}' in metrics


def test_cached_blocks_hold_the_computed_keys_and_values(engine):
    scheduler = fresh(engine)
    ids = engine.encode(TURN_1, chat=True)
    seq = run(scheduler, ids)
    cache = engine.new_cache(len(ids))
    engine.forward(ids, 0, cache)
    blocks = scheduler.prefix.lookup(ids, b"")
    assert len(blocks) == (len(ids) - 1) // 16 and seq.finish_reason == "length"
    for i, block in enumerate(blocks):
        assert torch.allclose(block.k, cache.k[:, :, i * 16:(i + 1) * 16], atol=1e-4)
        assert torch.allclose(block.v, cache.v[:, :, i * 16:(i + 1) * 16], atol=1e-4)
