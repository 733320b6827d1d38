"""Prefix caching: the keys and values of token prefixes kept across requests, so a prompt that
starts like an earlier sequence (a system prompt, a conversation's earlier turns) is prefilled
from where they part.

As vLLM's automatic prefix caching: sequences are cut into blocks of `BLOCK` tokens, and each
full block is stored under the chain of its tokens and all before it, so a lookup walks a
prompt's blocks from the start while they are held. Blocks live in one preallocated pool of
slots (`max_bytes` of them, taken at the first store), kept least-recently-used; a hit refreshes
its blocks last to first, so a prefix outlives its continuations and eviction trims sequences
from their ends. What is reused is exact: a block's tokens and its parent are checked on every
hit, not only its hash.

Restoring a prefix into a `KVCache` row, or storing a row's blocks, is a handful of tensor
operations whatever the number of blocks (one gather or scatter over the pool for the keys, one
for the values): on a busy CPU each operation waits to be scheduled, so their count matters more
than their bytes. The cache is valid for fixed weights only (a model that trains between uses
must not have one: `Engine`'s is off unless asked for).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

BLOCK = 16  # tokens per block


@dataclass(frozen=True)
class _Block:
    parent: int | None  # the key of the block before it; None for a sequence's first
    tokens: tuple[int, ...]
    slot: int  # where its keys and values are in the pool


class PrefixCache:
    """Full blocks of earlier sequences' keys and values, within `max_bytes`. `hit_tokens` and
    `query_tokens` count what lookups found against what they asked for; `evicted` counts
    blocks dropped to make room."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.blocks: OrderedDict[int, _Block] = OrderedDict()  # least recently used first
        self.keys: torch.Tensor | None = None  # (n_layer, n_head, slots, BLOCK, head_dim)
        self.values: torch.Tensor | None = None
        self.free: list[int] = []
        self.hit_tokens = 0
        self.query_tokens = 0
        self.evicted = 0

    @property
    def tokens(self) -> int:
        return len(self.blocks) * BLOCK

    @property
    def bytes(self) -> int:
        """Bytes the pool holds (all of its slots, used or not)."""
        if self.keys is None:
            return 0
        return 2 * self.keys.numel() * self.keys.element_size()

    def restore(self, tokens: Sequence[int], cache, row: int, limit: int) -> int:
        """Copy the longest held prefix of `tokens`, at most `limit` tokens, into the empty row
        `row` of `cache` (a `minigpt.engine.KVCache`); the tokens restored (a multiple of
        BLOCK)."""
        self.query_tokens += limit
        found = []
        for key, parent, block in _chain(tokens[:limit]):
            held = self.blocks.get(key)
            if held is None or held.parent != parent or held.tokens != block:
                break
            found.append(key)
        if not found or (cache.k is not None and cache.k.dtype != self.keys.dtype):
            return 0
        cache.storage_for(self.keys.dtype)
        slots = torch.tensor([self.blocks[key].slot for key in found], device=self.keys.device)
        n = len(found) * BLOCK
        for pool, into in ((self.keys, cache.k), (self.values, cache.v)):
            into[:, row, :, :n] = pool.index_select(2, slots).flatten(2, 3)
        for key in reversed(found):  # the prefix most recent: its blocks are evicted last
            self.blocks.move_to_end(key)
        cache.set_length(row, n)
        self.hit_tokens += n
        return n

    def store(self, tokens: Sequence[int], cache, row: int) -> None:
        """Keep the full blocks of `tokens` that row `row` of `cache` holds and this cache does
        not yet, evicting the least recently used others to make room."""
        if cache.k is None or not self._pool_for(cache):
            return
        chain = _chain(tokens[: cache.lengths[row]])
        for key, _, _ in reversed(chain):  # what is held of this sequence is not evicted now
            if key in self.blocks:
                self.blocks.move_to_end(key)
        new = [i for i, (key, _, _) in enumerate(chain) if key not in self.blocks]
        new = new[: len(self.free) + len(self.blocks) - (len(chain) - len(new))]
        if not new:
            return
        while len(self.free) < len(new):
            self.free.append(self.blocks.popitem(last=False)[1].slot)
            self.evicted += 1
        slots = [self.free.pop() for _ in new]
        index = torch.tensor(new, device=self.keys.device)
        at = torch.tensor(slots, device=self.keys.device)
        n = len(chain) * BLOCK
        for pool, source in ((self.keys, cache.k), (self.values, cache.v)):
            blocks = source[:, row, :, :n].unflatten(2, (len(chain), BLOCK))
            pool[:, :, at] = blocks.index_select(2, index)
        for i, slot in zip(new, slots, strict=True):
            key, parent, block = chain[i]
            self.blocks[key] = _Block(parent, block, slot)
        for key, _, _ in reversed(chain):
            self.blocks.move_to_end(key)

    def _pool_for(self, cache) -> bool:
        """The pool, allocated at the first store in the shape and dtype of `cache`'s blocks;
        False when `cache` holds another dtype or not one block fits in max_bytes."""
        layers, _, heads, _, dim = cache.k.shape
        if self.keys is None:
            block_bytes = 2 * layers * heads * BLOCK * dim * cache.k.element_size()
            slots = self.max_bytes // block_bytes
            if not slots:
                return False
            shape = (layers, heads, slots, BLOCK, dim)
            self.keys = torch.empty(shape, dtype=cache.k.dtype, device=cache.k.device)
            self.values = torch.empty_like(self.keys)
            self.free = list(range(slots))
        return self.keys.dtype == cache.k.dtype


def _chain(tokens: Sequence[int]) -> list[tuple[int, int | None, tuple[int, ...]]]:
    """(key, parent key, tokens) of each full block of `tokens`, first to last."""
    chain, parent = [], None
    for start in range(0, len(tokens) - BLOCK + 1, BLOCK):
        block = tuple(tokens[start : start + BLOCK])
        key = hash((parent, block))
        chain.append((key, parent, block))
        parent = key
    return chain
