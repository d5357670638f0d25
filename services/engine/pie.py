"""PIE (Positional Integrity Encoding): one document's KV kept in the paged cache across edits.

An edit replaces tokens [i, j) with m new tokens. PIE keeps the prefix KV, encodes the m new tokens
against the prefix, rotates every later key by d = m - (j - i) positions (one rotation of all layers at
once; values untouched) and updates their position ids. Baselines in the same code path: FULL re-encodes
the whole document (exact), SUFFIX re-encodes from the edit on (exact, cheaper), CONFLICT encodes the new
tokens but leaves later keys unrotated (fast, wrong relative positions).

Token ids only; runs on the engine thread. Blocks come from the scheduler's BlockPool, so documents and
requests share (and are limited by) one KV capacity. Storage order is free: positions are data
(DESIGN.md), so inserted tokens take any free slot, on any shard. Every operation that touches the model
or the KV tensors is a KV job (jobs.py): the `*_job` generators yield forward passes, which ride in the
engine's steps beside requests (SplitFuse), and slot operations (`shift_slots`, `copy_slots`,
`read_keys`), which the in-process Worker and the Ray ShardGroup both offer: on N shards each shard
rotates the keys it holds and the passes attend across shards with a ringattn schedule. The plain methods
(`encode`, `replace`, `predict`, ...) run the same jobs to their end through the engine (`run_job`).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from longbow.services.engine.errors import CapacityError
from longbow.services.engine.jobs import ExecutorCall, Job, KVPass
from longbow.services.engine.scheduler import BlockPool, blocks_for


class UpdateMode(str, enum.Enum):
    PIE = "pie"
    FULL = "full"
    SUFFIX = "suffix"
    CONFLICT = "conflict"


@dataclass
class UpdateStats:
    tokens_encoded: int
    tokens_rotated: int
    seconds: float


class DocumentKV:
    """Token ids of a document and the cache slot of each; token k's cached position is k.

    `run(job)` runs a KV job to its end (the engine's `run_job`); only the plain methods use it."""

    def __init__(self, pool: BlockPool, block_size: int, chunk_tokens: int = 512,
                 run: Callable[[Job], object] | None = None):
        self.pool, self.block_size, self.chunk_tokens, self._run = pool, block_size, chunk_tokens, run
        self.token_ids: list[int] = []
        self.slots: list[int] = []
        self.blocks: list[int] = []
        self._free: list[int] = []

    @classmethod
    def for_engine(cls, engine, chunk_tokens: int | None = None) -> "DocumentKV":
        cfg = engine.config.engine
        return cls(engine.scheduler.pool, cfg.block_size, chunk_tokens or engine.scheduler.token_budget,
                   engine.run_job)

    # ---- plain methods: each runs its job to the end -----------------------------------------------
    def encode(self, token_ids: list[int]) -> UpdateStats:
        return self.run(self.encode_job(token_ids))

    def replace(self, start: int, end: int, new_ids: list[int], mode: UpdateMode = UpdateMode.PIE) -> UpdateStats:
        return self.run(self.replace_job(start, end, new_ids, mode))

    def predict(self, prefix_tokens: int, extra_ids: list[int], max_tokens: int, stop_ids: set[int],
                stop_when=None, first_allowed: list[int] | None = None) -> list[int]:
        return self.run(self.predict_job(prefix_tokens, extra_ids, max_tokens, stop_ids, stop_when, first_allowed))

    def fork(self) -> "DocumentKV":
        return self.run(self.fork_job())

    def keys(self, layer: int) -> torch.Tensor:
        """[T, Hkv, D] cached keys of the document in token order (tests, diagnostics)."""
        by_slot = self.run(self._call(lambda executor: executor.read_keys(layer, list(self.slots))))
        return torch.stack([by_slot[slot] for slot in self.slots])

    def positions(self) -> list[int]:
        by_slot = self.run(self._call(lambda executor: executor.read_positions(list(self.slots))))
        return [by_slot[slot] for slot in self.slots]

    def run(self, job: Job):
        if self._run is None:
            raise RuntimeError("this DocumentKV has no engine to run its jobs (build it with for_engine)")
        return self._run(job)

    def release(self) -> None:
        self.pool.release(self.blocks)
        self.blocks, self._free, self.slots, self.token_ids = [], [], [], []

    # ---- jobs (jobs.py) --------------------------------------------------------------------------
    def encode_job(self, token_ids: list[int]) -> Job:
        """(Re-)encode the whole document from scratch (opening, FULL, drift re-encodes)."""
        began = time.perf_counter()
        self._free += self.slots
        self.token_ids, self.slots = [], []
        yield from self._insert_encoded(0, list(token_ids))
        return UpdateStats(len(token_ids), 0, time.perf_counter() - began)

    def fork_job(self) -> Job:
        """An independent copy (its own slots, K/V copied, no model pass): try edits side by side.
        Each copied slot sits on the same shard as its source, so the copy never crosses shards."""
        twin = DocumentKV(self.pool, self.block_size, self.chunk_tokens, self._run)
        try:
            mapping: dict[int, int] = {}
            twin.slots = [twin._slot_like(slot, mapping) for slot in self.slots]
            source, target = list(self.slots), list(twin.slots)
            yield ExecutorCall(lambda executor: executor.copy_slots(source, target))
        except BaseException:
            twin.release()
            raise
        twin.token_ids = list(self.token_ids)
        return twin

    def replace_job(self, start: int, end: int, new_ids: list[int], mode: UpdateMode = UpdateMode.PIE) -> Job:
        """Tokens [start, end) become new_ids; KV updated by `mode`."""
        began = time.perf_counter()
        if mode == UpdateMode.FULL:
            stats = yield from self.encode_job([*self.token_ids[:start], *new_ids, *self.token_ids[end:]])
            return UpdateStats(stats.tokens_encoded, 0, time.perf_counter() - began)
        if mode == UpdateMode.SUFFIX:
            suffix = [*new_ids, *self.token_ids[end:]]
            self._truncate(start)
            yield from self._insert_encoded(start, suffix)
            return UpdateStats(len(suffix), 0, time.perf_counter() - began)
        delta = len(new_ids) - (end - start)
        later_slots = self.slots[end:]
        self._free += self.slots[start:end]
        self.token_ids[start:end], self.slots[start:end] = [], []
        if later_slots and delta:
            rotate = mode == UpdateMode.PIE
            yield ExecutorCall(lambda executor: executor.shift_slots(later_slots, delta, rotate))
        yield from self._insert_encoded(start, list(new_ids))
        return UpdateStats(len(new_ids), len(later_slots), time.perf_counter() - began)

    def predict_job(self, prefix_tokens: int, extra_ids: list[int], max_tokens: int,
                    stop_ids: set[int], stop_when=None, first_allowed: list[int] | None = None) -> Job:
        """Greedy tokens continuing the first `prefix_tokens` tokens (+ extra_ids, e.g. the part of a
        token before the cursor). Later tokens stay cached but invisible; nothing cached is changed.
        `stop_when(generated_ids)` may end early (a finished line); `first_allowed` restricts the first
        token (token healing)."""
        if extra_ids:
            feed, position, visible = list(extra_ids), prefix_tokens, self.slots[:prefix_tokens]
        elif prefix_tokens:
            # The last prefix token's logits were not kept: run it again into a scratch slot.
            feed, position = [self.token_ids[prefix_tokens - 1]], prefix_tokens - 1
            visible = self.slots[:prefix_tokens - 1]
        else:
            return []
        generated, scratch = [], []
        try:
            while len(generated) < max_tokens:
                slots = self._take(len(feed))
                scratch += slots
                logits = yield self._pass(feed, list(range(position, position + len(feed))), slots, visible,
                                          want_logits=True)
                visible, position = visible + slots, position + len(feed)
                if first_allowed and not generated:
                    allowed = torch.tensor(first_allowed, dtype=torch.int64, device=logits.device)
                    token = int(allowed[torch.argmax(logits[allowed])])
                else:
                    token = int(torch.argmax(logits))
                if token in stop_ids:
                    break
                generated.append(token)
                if stop_when and stop_when(generated):
                    break
                feed = [token]
        finally:
            self._free += scratch
        return generated

    # ---- internals -----------------------------------------------------------------------------
    def _insert_encoded(self, start: int, new_ids: list[int]) -> Job:
        """Encode new_ids at positions start.. against the prefix only, and splice them in (at the end
        when start == len(token_ids): opening, re-encoding, suffix recompute). The engine may cut each
        pass further to fit its steps."""
        new_slots: list[int] = []
        for lo in range(0, len(new_ids), self.chunk_tokens):
            chunk = new_ids[lo: lo + self.chunk_tokens]
            slots = self._take(len(chunk))
            positions = list(range(start + lo, start + lo + len(chunk)))
            yield self._pass(chunk, positions, slots, self.slots[:start] + new_slots)
            new_slots += slots
        self.token_ids[start:start] = new_ids
        self.slots[start:start] = new_slots

    @staticmethod
    def _call(fn) -> Job:
        return (yield ExecutorCall(fn))

    def _pass(self, token_ids, positions, new_slots, visible_slots, want_logits: bool = False) -> KVPass:
        """token_ids at positions, their K/V into new_slots, attending to visible_slots + themselves
        (causally by position); with `want_logits` the job is sent the last row's logits [V]."""
        last_shard = self.pool.shard_of(new_slots[-1] // self.block_size)
        # Every pass sees the document's first tokens (token k at position k) and then its own: keys in
        # position order, so attention can skip position masks.
        in_order = positions[0] == len(visible_slots) and all(
            b == a + 1 for a, b in zip(positions, positions[1:]))
        return KVPass(list(token_ids), list(positions), list(new_slots), list(visible_slots), last_shard,
                      want_logits, in_order)

    def _truncate(self, keep: int) -> None:
        self._free += self.slots[keep:]
        del self.token_ids[keep:], self.slots[keep:]

    def _take(self, n: int) -> list[int]:
        """n free slots, allocating blocks from the shared pool when the document's own run out
        (round robin over shards, like requests' blocks)."""
        missing = n - len(self._free)
        if missing > 0:
            need = blocks_for(missing, self.block_size)
            if not self.pool.can_allocate(need, len(self.blocks)):
                raise CapacityError(f"KV cache is full: {need} more blocks needed for this document")
            for block in self.pool.allocate(need, len(self.blocks)):
                self._own(block)
        taken, self._free = self._free[:n], self._free[n:]
        return taken

    def _own(self, block: int) -> None:
        self.blocks.append(block)
        self._free += range(block * self.block_size, (block + 1) * self.block_size)

    def _slot_like(self, slot: int, mapping: dict[int, int]) -> int:
        """A slot of this document at the same offset of a block on the same shard as `slot`'s block."""
        bs = self.block_size
        source_block = slot // bs
        if source_block not in mapping:
            block = self.pool.allocate_on_shard(self.pool.shard_of(source_block))
            if block is None:
                raise CapacityError("KV cache is full: cannot fork this document")
            mapping[source_block] = block
            self.blocks.append(block)
            self._free += range(block * bs, (block + 1) * bs)
        target = mapping[source_block] * bs + slot % bs
        self._free.remove(target)
        return target
