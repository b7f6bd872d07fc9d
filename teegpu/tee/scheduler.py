"""Continuous batching on the trusted side.

Requests join and leave at step boundaries. One step packs the rows of every running
sequence (one decode token each, with its drafted tokens under speculation, plus prompt
chunks up to `prefill_chunk` tokens in all) into one activation per linear op, so a step
costs 4L+1 round trips however many users share it. Each sequence keeps its own KV cache,
reserved in a byte budget (`KVBudget`, shared with the prefix cache's blocks) at admission,
its own sampler and its own stop rules; its tokens never depend on its neighbours beyond
float rounding. The n choices of one prompt share its prefill (`leader`), and a prompt that
starts as an earlier one copies the earlier one's blocks (tee/prefix_cache.py).

`submit` and `cancel` may be called from any thread; `step` (or `run`, a loop of steps)
from one thread only. Events reach each sequence's `on_event` on the stepping thread.
"""
from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from teegpu.config import GenerationConfig, SchedulerConfig, SpeculativeConfig
from teegpu.errors import ConfigError, ContextLengthError, Overloaded, ServerUnavailable, TeegpuError
from teegpu.model.llama import KVCache, Segment
from teegpu.tee.prefix_cache import PrefixCache
from teegpu.tee.sampling import adjust, check_draft, distribution, sample, token_logprobs
from teegpu.tee.speculation import SpeculationStats, prompt_lookup
from teegpu.tee.text_stream import TextStream

PING_INTERVAL_S = 2.0  # how often an idle scheduler checks that the server still answers
DRAFT_RETRY_STEPS = 4  # speculation: a sequence whose drafts stopped being kept tries one every so many steps


@dataclass(slots=True)
class Event:
    """What a sequence produced in one step: new text, the logprobs of its new tokens, and at
    the end a finish reason ("stop", "length", "cancelled") or an error."""

    text: str = ""
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    error: BaseException | None = None


class Sequence:
    """One request's state: prompt, generated tokens, its cache and its sampler.

    A sequence submitted with a `leader` (another choice of the same prompt, OpenAI's n > 1) does not
    prefill: once the leader's prompt is in its cache, the follower copies those positions and
    samples its first token from the same logits. It prefills by itself only if the leader ended
    before the follower found a place."""

    def __init__(self, seq_id: int, prompt_ids: list[int], gen: GenerationConfig, stream: TextStream,
                 on_event: Callable[[Event], None] | None, leader: Sequence | None = None, salt: bytes = b""):
        self.id, self.prompt_ids, self.gen, self.stream = seq_id, prompt_ids, gen, stream
        self.salt = salt  # the prefix cache's: only sequences with the same salt share cached blocks
        self.on_event = on_event
        self.rng = torch.Generator().manual_seed(gen.seed) if gen.seed is not None else None
        self.out: list[int] = []
        self.cache: KVCache | None = None
        self.reserved_bytes = 0
        self.prefilled = 0  # prompt tokens already in the cache
        self.cached_tokens = 0  # of which came from the prefix cache
        self.written = 0  # positions of the cache holding keys and values (the last sampled token's are not yet)
        self.draft_limit = 0  # speculation: most tokens to draft next (adapts to how many were accepted)
        self.cancelled = False
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.logprobs: list = []
        self.prompt_logprobs: list = []  # with gen.prompt_logprobs: one entry per prompt token
        self.ended_at_eos = False
        self.leader, self.followers = leader, []
        self.tail_logits: torch.Tensor | None = None  # a leader's last prompt logits, while followers wait
        self.done = threading.Event()
        self.submitted_s = time.monotonic()
        self.started_s: float | None = None
        self.first_token_s: float | None = None
        self.decode_s, self.decode_steps = 0.0, 0
        self.decode_tokens = 0  # tokens the decode steps chose (more than the steps when drafts were kept)

    @property
    def positions(self) -> int:
        return len(self.prompt_ids) + self.gen.max_new_tokens

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.prompt_ids)

    @property
    def text(self) -> str:
        return self.stream.text

    @property
    def completion_tokens(self) -> int:
        """Tokens generated, the end-of-sequence token included (as OpenAI counts them)."""
        return len(self.out) + self.ended_at_eos


class KVBudget:
    """Bytes of KV cache reserved by running sequences, against the configured budget, which the prefix
    cache's blocks share: a running sequence always wins over cached blocks."""

    def __init__(self, budget_bytes: int, prefix: PrefixCache | None = None):
        self.budget, self.used, self.prefix = budget_bytes, 0, prefix

    def try_reserve(self, nbytes: int) -> bool:
        if self.used + nbytes > self.budget:
            return False
        self.used += nbytes
        self.fit_prefix()
        return True

    def fit_prefix(self) -> None:
        if self.prefix is not None:
            self.prefix.evict(self.used + self.prefix.bytes - self.budget)

    def release(self, nbytes: int) -> None:
        self.used -= nbytes


class Scheduler:
    def __init__(self, engine, config: SchedulerConfig | None = None, speculative: SpeculativeConfig | None = None):
        self.engine = engine
        self.config = config or SchedulerConfig()
        self.speculative = speculative if speculative is not None and speculative.enabled else None
        self.speculation = SpeculationStats()
        self.prefix = engine.prefix_cache(self.config.prefix_block_tokens) if self.config.prefix_cache else None
        self.kv = KVBudget(self.config.kv_cache_mb << 20, self.prefix)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.server_ok = True  # the last step or ping reached the server
        self.on_step: Callable[[float, int], None] | None = None  # (seconds, rows) of each step
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)

    # -- requests in, from any thread --

    def submit(self, prompt_ids: list[int], gen: GenerationConfig,
               on_event: Callable[[Event], None] | None = None, leader: Sequence | None = None,
               salt: bytes = b"") -> Sequence:
        """Queue a request; raise ContextLengthError if it can never fit, Overloaded if the queue is full.
        With `leader` (a sequence of the same prompt), it shares the leader's prefill; `salt` keeps its
        prefix cache blocks apart from those of other salts (tenants)."""
        window = self.engine.config.max_position_embeddings
        if len(prompt_ids) + gen.max_new_tokens > window:
            raise ContextLengthError(
                f"prompt of {len(prompt_ids)} tokens + max_new_tokens {gen.max_new_tokens} = "
                f"{len(prompt_ids) + gen.max_new_tokens} exceeds the context window of {window} tokens")
        if self.engine.cache_bytes(len(prompt_ids) + gen.max_new_tokens) > self.kv.budget:
            raise ConfigError(f"a KV cache for {len(prompt_ids) + gen.max_new_tokens} positions exceeds the whole "
                              f"KV budget of {self.config.kv_cache_mb} MB: ask for fewer tokens")
        self.engine.check_ids(prompt_ids)
        vocab = self.engine.config.vocab_size
        for token, _ in gen.logit_bias:
            if not 0 <= token < vocab:
                raise ConfigError(f"logit_bias names token {token}, outside the vocabulary [0, {vocab})")
        if leader is not None and list(prompt_ids) != leader.prompt_ids:
            raise ConfigError("a follower shares its leader's prompt: the ids differ")
        seq = Sequence(next(self._ids), list(prompt_ids), gen, self.engine.text_stream(gen.stop), on_event, leader,
                       salt)
        seq.draft_limit = self.speculative.num_speculative_tokens if self.speculative else 0
        with self._lock:
            places = self.config.max_queue + max(0, self.config.max_batch - len(self.running))
            if len(self.waiting) >= places:
                raise Overloaded(f"{len(self.waiting)} requests already wait for a place: try again later")
            self.waiting.append(seq)
            if leader is not None:
                leader.followers.append(seq)
            self._wake.notify()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop a sequence at the next step boundary and free its cache (a client went away)."""
        seq.cancelled = True
        self.wake()

    def wake(self) -> None:
        """Interrupt an idle `run` (a cancellation, or its stop event was set)."""
        with self._lock:
            self._wake.notify()

    def counts(self) -> tuple[int, int]:
        """(running, waiting) sequences."""
        with self._lock:
            return len(self.running), len(self.waiting)

    # -- steps, from one thread --

    def run(self, stop: threading.Event) -> None:
        """Step while there is work; when idle, wait for requests and ping the server now and then."""
        while not stop.is_set():
            if self.step():
                continue
            with self._lock:
                if not self.waiting and not self.running:
                    self._wake.wait(PING_INTERVAL_S)
                    idle = not self.waiting and not self.running
                else:
                    idle = False
            if idle and not stop.is_set():
                self.server_ok = self.engine.ping()

    @torch.inference_mode()
    def step(self) -> bool:
        """One step over every running sequence; False when there was nothing to do."""
        with self._lock:
            self._retire_cancelled()
            self._admit()
        forked = self._fork_late_followers()
        with self._lock:
            plan = self._plan()
        if not plan:
            return forked
        start = time.monotonic()
        for seq, _, _ in plan:
            seq.started_s = seq.started_s or start
        ids = [t for _, chunk, _ in plan for t in chunk]
        segments = [Segment(seq.cache, pos, len(chunk)) for seq, chunk, pos in plan]
        logit_rows, reads = self._logit_rows(plan)
        try:
            logits = self.engine.forward_packed(ids, segments, logit_rows)
        except Exception as e:  # the step failed: its sequences end with the error, the others go on
            self.server_ok = not isinstance(e, ServerUnavailable)
            for seq, _, _ in plan:
                self._finish(seq, None, as_teegpu_error(e))
            return True
        self.server_ok = True
        elapsed = time.monotonic() - start
        for seq, chunk, pos in plan:
            seq.written = pos + len(chunk)
            if seq.decoding:
                seq.decode_s += elapsed
                seq.decode_steps += 1
            else:
                seq.prefilled += len(chunk)
                if seq.decoding:
                    self._keep_prefix(seq)
        for seq, chunk, pos, first, row, decode in reads:
            if decode:
                self._verify(seq, chunk, pos, logits[row:row + len(chunk)])
                continue
            if first is not None:
                self._prompt_logprobs(seq, pos, logits[first:first + len(chunk)])
            if row is not None:
                self._take(seq, logits[row])
        if self.on_step is not None:
            self.on_step(elapsed, len(ids))
        return True

    @staticmethod
    def _logit_rows(plan) -> tuple[list[int], list]:
        """The packed rows whose logits the step needs (each prefilling sequence's last row when it
        samples, every row of a decoding sequence's last token and drafts, and every row of a chunk
        whose prompt logprobs were asked for), and for each sequence of the plan where its rows land:
        (seq, chunk, position, first prompt-logprob row or None, sampling row or None, decoding)."""
        rows, reads, end = [], [], 0
        for seq, chunk, pos in plan:
            end += len(chunk)
            if seq.decoding:
                reads.append((seq, chunk, pos, None, len(rows), True))
                rows += range(end - len(chunk), end)
                continue
            first = None
            if seq.gen.prompt_logprobs:
                first = len(rows)
                rows += range(end - len(chunk), end)
            samples = pos + len(chunk) >= len(seq.prompt_ids)
            if samples and first is None:
                rows.append(end - 1)
            reads.append((seq, chunk, pos, first, len(rows) - 1 if samples else None, False))
        return rows, reads

    def _retire_cancelled(self) -> None:
        for seq in [s for s in self.waiting if s.cancelled]:
            self.waiting.remove(seq)
            self._finish(seq, "cancelled", locked=True)
        for seq in [s for s in self.running if s.cancelled]:
            self._finish(seq, "cancelled", locked=True)

    def _admit(self) -> None:
        """Move waiting requests into the batch, first come first served, while places and KV budget allow."""
        while self.waiting and len(self.running) < self.config.max_batch:
            seq = self.waiting[0]
            nbytes = self.engine.cache_bytes(seq.positions)
            if self.kv.used + nbytes > self.kv.budget:
                return
            blocks = []  # found before the reservation evicts blocks to make room (these stay held here)
            if self.prefix is not None and seq.leader is None and not seq.gen.prompt_logprobs:
                blocks = self.prefix.lookup(seq.prompt_ids, seq.salt)
            self.kv.try_reserve(nbytes)
            self.waiting.popleft()
            seq.reserved_bytes = nbytes
            seq.cache = self.engine.new_cache(seq.positions)
            seq.prefilled = seq.cached_tokens = seq.written = self.prefix.load(blocks, seq.cache) if blocks else 0
            self.running.append(seq)

    def _keep_prefix(self, seq: Sequence) -> None:
        """Offer a sequence's computed positions to the prefix cache (its prompt, and what it generated)."""
        if self.prefix is not None and seq.cache is not None:
            self.prefix.store(seq.prompt_ids + seq.out, seq.salt, seq.cache, seq.written)
            self.kv.fit_prefix()

    def _plan(self) -> list[tuple[Sequence, list[int], int]]:
        """(sequence, token ids, position of the first) of this step: every decoding sequence's
        last token, then prompt chunks in admission order up to the prefill budget."""
        plan = [(s, [s.out[-1], *self._drafts(s)], len(s.prompt_ids) + len(s.out) - 1) for s in self.running
                if s.decoding]
        budget = self.config.prefill_chunk
        for seq in self.running:
            if seq.decoding or seq.leader is not None or budget == 0:
                continue
            n = min(budget, len(seq.prompt_ids) - seq.prefilled)
            plan.append((seq, seq.prompt_ids[seq.prefilled:seq.prefilled + n], seq.prefilled))
            budget -= n
        return plan

    def _prompt_logprobs(self, seq: Sequence, pos: int, logits: torch.Tensor) -> None:
        """Entries of the prompt tokens this chunk's rows predict (the first token has no logprob)."""
        ids, text = seq.prompt_ids, self.engine.token_text
        if pos == 0:
            seq.prompt_logprobs.append({"id": ids[0], "token": text(ids[0]), "logprob": None, "top": None})
        for j in range(min(len(logits), len(ids) - pos - 1)):
            seq.prompt_logprobs.append(token_logprobs(logits[j], ids[pos + j + 1], seq.gen.logprobs, text))

    def _take(self, seq: Sequence, logits: torch.Tensor) -> None:
        """Sample a sequence's next token from its logits row (its followers' first tokens too, once its
        prompt is in its cache), and advance it."""
        seq.first_token_s = seq.first_token_s or time.monotonic()  # the prefill's end
        try:
            if not seq.out and seq.followers:
                seq.tail_logits = logits.clone()
                for follower in [f for f in seq.followers if f.cache is not None and not f.decoding]:
                    self._fork(follower, seq)
            if seq.gen.max_new_tokens == 0:
                return self._finish(seq, "length")
            self._advance(seq, self._choose(seq, logits), logits)
        except Exception as e:  # one sequence's failure (its tokenizer, its callback) ends it alone
            self._finish(seq, None, as_teegpu_error(e))

    @staticmethod
    def _choose(seq: Sequence, logits: torch.Tensor, draft: int | None = None) -> int:
        """The next token from a row's logits: greedy or sampled, with the sequence's bias and penalties;
        a draft is kept or replaced so that the token is distributed as without it."""
        gen = seq.gen
        adjusted = adjust(logits, gen.logit_bias, gen.presence_penalty, gen.frequency_penalty, seq.out)
        if gen.temperature <= 0:
            return int(adjusted.argmax())
        if draft is None:
            return sample(adjusted, gen.temperature, gen.top_k, gen.top_p, seq.rng)
        return check_draft(distribution(adjusted, gen.temperature, gen.top_k, gen.top_p), draft, seq.rng)

    def _verify(self, seq: Sequence, chunk: list[int], pos: int, rows: torch.Tensor) -> None:
        """A decode step's tokens: row i's choice is checked against draft i+1; every draft kept is a
        token gained, the first one replaced ends the step (its position and those after it are
        overwritten by the next step: the cache rolls back by `written`)."""
        drafts, kept = chunk[1:], 0
        seq.written = pos + 1
        try:
            for i, row in enumerate(rows):
                draft = drafts[i] if i < len(drafts) else None
                token = self._choose(seq, row, draft)
                seq.decode_tokens += 1
                hit = token == draft
                kept += hit
                seq.written += hit
                self._advance(seq, token, row)
                if seq.done.is_set() or not hit:
                    break
        except Exception as e:
            self._finish(seq, None, as_teegpu_error(e))
        if drafts:
            self._adapt(seq, len(drafts), kept)

    def _adapt(self, seq: Sequence, drafted: int, kept: int) -> None:
        """Draft one more after a step that kept every draft, as many as were kept after one that did not
        (none after a miss: then only every few steps, one)."""
        stats = self.speculation
        stats.steps, stats.drafted, stats.accepted, stats.tokens = (stats.steps + 1, stats.drafted + drafted,
                                                                    stats.accepted + kept, stats.tokens + kept + 1)
        limit = self.speculative.num_speculative_tokens
        seq.draft_limit = min(limit, drafted + 1) if kept == drafted else kept

    def _drafts(self, seq: Sequence) -> list[int]:
        """This step's drafted tokens for a decoding sequence (none without speculation, or past its
        max_new_tokens)."""
        spec = self.speculative
        if spec is None:
            return []
        k = seq.draft_limit or (1 if seq.decode_steps % DRAFT_RETRY_STEPS == 0 else 0)
        k = min(k, seq.gen.max_new_tokens - len(seq.out) - 1)
        return prompt_lookup(seq.prompt_ids + seq.out, spec.ngram_min, spec.ngram_max, k)

    def _fork(self, follower: Sequence, leader: Sequence) -> None:
        """Give a follower the leader's prompt positions and its first token."""
        n = len(leader.prompt_ids)
        follower.cache.k[:, :, :n] = leader.cache.k[:, :, :n]
        follower.cache.v[:, :, :n] = leader.cache.v[:, :, :n]
        follower.prefilled, follower.written, follower.leader = n, n, None
        follower.cached_tokens = leader.cached_tokens
        follower.started_s = follower.started_s or time.monotonic()
        follower.prompt_logprobs = list(leader.prompt_logprobs)
        self._take(follower, leader.tail_logits)

    def _fork_late_followers(self) -> bool:
        """Followers admitted after their leader's prefill fork now; those whose leader has ended
        prefill by themselves."""
        late = [s for s in self.running if s.leader is not None and not s.decoding]
        for seq in late:
            leader = seq.leader
            if leader.cache is not None and leader.tail_logits is not None:
                self._fork(seq, leader)
            elif leader.cache is None and leader.done.is_set():
                seq.leader = None
        return any(s.leader is None for s in late)

    def _advance(self, seq: Sequence, token: int, logits: torch.Tensor) -> None:
        """Take the sampled token: emit its text, or finish at EOS, a stop string or the length limit."""
        if seq.gen.stop_at_eos and token in self.engine.stop_ids:
            seq.ended_at_eos = True  # counted in usage, not shown: its text is not the answer's
            return self._finish(seq, "stop")
        seq.out.append(token)
        entries = []
        if seq.gen.logprobs is not None:
            entries = [token_logprobs(logits, token, seq.gen.logprobs, self.engine.token_text)]
            seq.logprobs += entries
        delta, stopped = seq.stream.push(seq.out)
        if stopped or len(seq.out) == seq.gen.max_new_tokens:
            return self._finish(seq, "stop" if stopped else "length", events=Event(delta, entries))
        if (delta or entries) and seq.on_event is not None:
            seq.on_event(Event(delta, entries))

    def _finish(self, seq: Sequence, reason: str | None, error: BaseException | None = None,
                events: Event | None = None, locked: bool = False) -> None:
        """End a sequence: free its cache, flush its text, tell its owner."""
        if not locked:
            with self._lock:
                return self._finish(seq, reason, error, events, locked=True)
        if seq in self.running:
            self.running.remove(seq)
            self.kv.release(seq.reserved_bytes)
            if error is None:
                self._keep_prefix(seq)
        seq.cache, seq.tail_logits, seq.finish_reason, seq.error = None, None, reason, error
        event = events or Event()
        if error is None and reason != "cancelled":
            event.text += seq.stream.finish(seq.out)
        event.finish_reason, event.error = reason, error
        if seq.on_event is not None:
            try:
                seq.on_event(event)
            except Exception:
                pass  # the owner's failure must not stop the others
        seq.done.set()


def as_teegpu_error(e: Exception) -> TeegpuError:
    """A typed error for a sequence's owner; an unexpected one keeps its cause for debugging."""
    if isinstance(e, TeegpuError):
        return e
    wrapped = TeegpuError(f"{type(e).__name__}: {e}")
    wrapped.__cause__ = e
    return wrapped
