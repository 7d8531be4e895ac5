"""A prefix index: which pool block holds which prompt tokens, for a backend's prefix cache.

Blocks of ``block`` tokens keyed by a hash chain: a block's key is ``(its parent block's id, its
tokens)``, so a block matches only when every token before it matched too. Why blocks and not a
radix tree: every block is the same size, so a pool is a fixed array of slots with no
fragmentation, a lookup is one dict probe per block, and eviction frees whole slots. Reuse is still
token-exact, as a radix tree's: past the last whole block that matches, a cached child block whose
first ``j < block`` tokens match the prompt's next ones lends those ``j`` (its keys/values for them
depend only on the tokens before, all equal), found by a second index from the hash of ``(parent,
first j tokens)`` to the block that last was indexed or lent that head, at most ``block - 1``
probes (ints, not tuples, as keys: ~0.5 KB a block). Lending re-points the heads to the lender, the
most recently used of its siblings, so the entry rarely goes with an eviction (if it does, an
older sibling with the same head stops lending it until one is indexed or lends again). A block is
always touched after its descendants, so the least recently used block is a leaf.

Pure Python, no tensors: the backend keeps the keys/values of each slot (the HF backend in
``KVSlab.pool``; the fake backend keeps none). The device thread looks up, inserts and evicts; the
host thread only peeks (``prepare``'s hint to the scheduler). A lock makes each of these one
consistent operation; it is uncontended but for a peek that lands during a lookup or insert.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["PrefixCache", "PrefixStats"]


@dataclass(slots=True)
class PrefixStats:
    """Running totals: prompt tokens looked up, of which served from the cache, blocks evicted."""

    lookup_tokens: int = 0
    hit_tokens: int = 0
    evictions: int = 0

    @property
    def hit_ratio(self) -> float:
        return self.hit_tokens / self.lookup_tokens if self.lookup_tokens else 0.0


@dataclass(slots=True, eq=False)
class _Block:
    uid: int  # never reused: a stale child key can never match a new parent
    slot: int  # pool block index
    key: tuple[int, tuple[int, ...]]


class PrefixCache:
    """An LRU index of ``capacity`` pool blocks of ``block`` tokens each."""

    def __init__(self, capacity: int, block: int = 8) -> None:
        if capacity < 1 or block < 1:
            raise ValueError("a prefix cache needs at least one block of at least one token")
        self.block, self.capacity = block, capacity
        self._index: dict[tuple[int, tuple[int, ...]], _Block] = {}
        self._heads: dict[int, _Block] = {}  # hash((parent uid, first j tokens)), 0 < j < block
        self._lru: OrderedDict[int, _Block] = OrderedDict()  # by uid, least recent first
        self._free = list(range(capacity - 1, -1, -1))
        self._uids = itertools.count(1)
        self._lock = threading.Lock()
        self.stats = PrefixStats()

    @property
    def cached_tokens(self) -> int:
        return len(self._lru) * self.block

    def _chain(self, ids: Sequence[int], limit: int) -> list[_Block]:
        chain: list[_Block] = []
        parent, b = 0, self.block
        for i in range(0, limit - b + 1, b):
            hit = self._index.get((parent, tuple(ids[i : i + b])))
            if hit is None:
                break
            chain.append(hit)
            parent = hit.uid
        return chain

    def _lookup(self, ids: Sequence[int], limit: int) -> tuple[list[_Block], int]:
        """The blocks holding the longest cached prefix of ``ids[:limit]`` and its length in
        tokens: whole blocks, then possibly the head of one more."""
        chain = self._chain(ids, limit)
        tokens = len(chain) * self.block
        parent = chain[-1].uid if chain else 0
        for j in range(min(self.block - 1, limit - tokens), 0, -1):
            head = tuple(ids[tokens : tokens + j])
            lender = self._heads.get(hash((parent, head)))
            if lender is not None and lender.key[0] == parent and lender.key[1][:j] == head:
                return [*chain, lender], tokens + j
        return chain, tokens

    def _touch(self, chain: Sequence[_Block]) -> None:
        for blk in reversed(chain):  # parents end up more recent than their children
            self._lru.move_to_end(blk.uid)

    def peek(self, ids: Sequence[int]) -> int:
        """Tokens :meth:`match` would reuse for prompt ``ids`` now; no LRU touch, not counted.
        Safe from any thread (the scheduler's hint: a step may evict them before the prompt runs)."""
        with self._lock:
            return self._lookup(ids, len(ids) - 1)[1]

    def match(self, ids: Sequence[int]) -> tuple[list[int], int]:
        """The longest cached prefix of prompt ``ids``, always leaving its last token to compute
        (for its logits): the pool slots that hold it, in order, and its length in tokens (the
        last slot may lend only its first tokens); counted in ``stats``."""
        with self._lock:
            chain, tokens = self._lookup(ids, len(ids) - 1)
            self._touch(chain)
            if tokens % self.block:  # the last block lends its head: it is now the one to find
                self._index_heads(chain[-1])
            self.stats.lookup_tokens += len(ids)
            self.stats.hit_tokens += tokens
            return [blk.slot for blk in chain], tokens

    def insert(self, ids: Sequence[int]) -> list[tuple[int, int]]:
        """Index every full block of ``ids`` (tokens whose keys/values exist); return the
        ``(first position, pool slot)`` of each new block, for the caller to fill. Evicts least
        recently used blocks when the pool is full; stops early rather than evict its own chain."""
        with self._lock:
            return self._insert(ids)

    def _insert(self, ids: Sequence[int]) -> list[tuple[int, int]]:
        b = self.block
        chain = self._chain(ids, len(ids))
        new: list[tuple[int, int]] = []
        parent = chain[-1].uid if chain else 0
        self._touch(chain)
        mine = {blk.uid for blk in chain}
        for i in range(len(chain) * b, len(ids) - b + 1, b):
            if not self._free:
                victim = next(iter(self._lru.values()))
                if victim.uid in mine:
                    break
                self._evict(victim)
            blk = _Block(next(self._uids), self._free.pop(), (parent, tuple(ids[i : i + b])))
            self._index[blk.key] = blk
            self._index_heads(blk)
            self._lru[blk.uid] = blk
            chain.append(blk)
            mine.add(blk.uid)
            new.append((i, blk.slot))
            parent = blk.uid
        self._touch(chain)
        return new

    def _index_heads(self, blk: _Block) -> None:
        parent, tokens = blk.key
        for j in range(1, self.block):
            self._heads[hash((parent, tokens[:j]))] = blk

    def _evict(self, blk: _Block) -> None:
        del self._lru[blk.uid]
        del self._index[blk.key]
        parent, tokens = blk.key
        for j in range(1, self.block):
            head = hash((parent, tokens[:j]))
            if self._heads.get(head) is blk:
                del self._heads[head]
        self._free.append(blk.slot)
        self.stats.evictions += 1

    def clear(self) -> None:
        """Forget every block (the pool was freed); the stats stay."""
        with self._lock:
            self._index.clear()
            self._heads.clear()
            self._lru.clear()
            self._free = list(range(self.capacity - 1, -1, -1))
