"""The KV of prompt blocks already computed, kept for the next request that starts the same way.

Chat turn 5 re-sends turns 1-4: their keys and values are here from turn 4, so only the new
tokens are prefilled (no round trips, and under otp no pads, for the rest). Blocks hold
`block_tokens` positions of every layer; a block's key is a hash chained over every token
before it and a salt, so a hit means the whole prefix is the same, and requests with other
salts (other API keys, or another `cache_salt`) never hit each other's blocks: the time to
first token would otherwise tell one user what another sent (docs/security.md).

The cache lives in the scheduler's KV budget: running sequences reserve first, and blocks are
evicted least recently used when they need the room. It lives in the trusted side only.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

import torch

from teegpu.model.llama import KVCache


@dataclass(slots=True)
class Block:
    k: torch.Tensor  # (layers, kv_heads, block_tokens, head_dim)
    v: torch.Tensor

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


@dataclass(slots=True)
class PrefixStats:
    queried_tokens: int = 0  # prompt tokens looked up
    hit_tokens: int = 0  # of which were found
    blocks: int = 0
    bytes: int = 0
    evicted_blocks: int = 0


class PrefixCache:
    def __init__(self, block_tokens: int):
        self.block_tokens = block_tokens
        self._blocks: OrderedDict[bytes, Block] = OrderedDict()  # least recently used first
        self.bytes = 0
        self.stats = PrefixStats()

    def keys(self, ids: list[int], salt: bytes, blocks: int) -> list[bytes]:
        """The chained keys of the first `blocks` full blocks of ids."""
        keys, key, b = [], hashlib.sha256(salt).digest(), self.block_tokens
        for i in range(blocks):
            key = hashlib.sha256(key + array("q", ids[i * b:(i + 1) * b]).tobytes()).digest()
            keys.append(key)
        return keys

    def lookup(self, ids: list[int], salt: bytes) -> list[Block]:
        """The cached blocks of the longest cached prefix of ids, leaving at least one token to
        prefill (its logits are the next token's)."""
        found = []
        for key in self.keys(ids, salt, (len(ids) - 1) // self.block_tokens):
            block = self._blocks.get(key)
            if block is None:
                break
            found.append((key, block))
        for key, _ in reversed(found):  # the chain's head most recent: eviction takes tails first
            self._blocks.move_to_end(key)
        self.stats.queried_tokens += len(ids)
        self.stats.hit_tokens += len(found) * self.block_tokens
        return [block for _, block in found]

    def load(self, blocks: list[Block], cache: KVCache) -> int:
        """Copy blocks into the first positions of a sequence's cache; the positions filled."""
        b = self.block_tokens
        for i, block in enumerate(blocks):
            cache.k[:, :, i * b:(i + 1) * b] = block.k
            cache.v[:, :, i * b:(i + 1) * b] = block.v
        return len(blocks) * b

    def store(self, ids: list[int], salt: bytes, cache: KVCache, written: int) -> None:
        """Keep the full blocks among the first `written` positions of a sequence (ids: its tokens)."""
        b = self.block_tokens
        keys = self.keys(ids, salt, min(written, len(ids)) // b)
        for i, key in enumerate(keys):
            if key in self._blocks:
                continue
            block = Block(cache.k[:, :, i * b:(i + 1) * b].clone(), cache.v[:, :, i * b:(i + 1) * b].clone())
            self._blocks[key] = block
            self.bytes += block.nbytes
        for key in reversed(keys):
            self._blocks.move_to_end(key)
        self._count()

    def evict(self, nbytes: int) -> None:
        """Free at least nbytes, least recently used blocks first (or all there are)."""
        freed = 0
        while self._blocks and freed < nbytes:
            _, block = self._blocks.popitem(last=False)
            freed += block.nbytes
            self.bytes -= block.nbytes
            self.stats.evicted_blocks += 1
        self._count()

    def _count(self) -> None:
        self.stats.blocks, self.stats.bytes = len(self._blocks), self.bytes
