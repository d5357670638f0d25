"""PIE (Positional Integrity Encoding): one document's KV kept in the paged cache across edits.

An edit replaces tokens [i, j) with m new tokens. PIE keeps the prefix KV, encodes the m new tokens
against the prefix, rotates every later key by d = m - (j - i) positions (one rotation of all layers at
once; values untouched) and updates their position ids. Baselines in the same code path: FULL re-encodes
the whole document (exact), SUFFIX re-encodes from the edit on (exact, cheaper), CONFLICT encodes the new
tokens but leaves later keys unrotated (fast, wrong relative positions).

Token ids only; runs on the engine thread. Blocks come from the scheduler's BlockPool, so documents and
requests share (and are limited by) one KV capacity. Storage order is free: positions are data
(DESIGN.md), so inserted tokens take any free slot.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass

import torch

from ringattn.rope import rotate_keys_by
from services.engine.errors import CapacityError
from services.engine.kv_cache import LocalPagedAttention, LocalStepMeta, Segment
from services.engine.scheduler import BlockPool, blocks_for
from services.engine.worker import ModelRunner


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
    """Token ids of a document and the cache slot of each; token k's cached position is k."""

    def __init__(self, runner: ModelRunner, pool: BlockPool, chunk_tokens: int = 512):
        if not isinstance(runner.backend, LocalPagedAttention):
            # NOTE: the shard group's runners sit in Ray actors; PIE there needs the encode/rotate calls
            # forwarded per shard (each rotates the slots it holds). Not built yet: refuse clearly.
            raise NotImplementedError("edit sessions need the in-process engine (engine.shards = 0)")
        self.runner, self.pool, self.chunk_tokens = runner, pool, chunk_tokens
        self.cache = runner.cache
        self.token_ids: list[int] = []
        self.slots: list[int] = []
        self.blocks: list[int] = []
        self._free: list[int] = []

    # ---- whole-document encoding ---------------------------------------------------------------
    def encode(self, token_ids: list[int]) -> UpdateStats:
        """(Re-)encode the whole document from scratch (opening, FULL, drift re-encodes)."""
        began = time.perf_counter()
        self._free += self.slots
        self.token_ids, self.slots = [], []
        self._encode_at(0, list(token_ids))
        return UpdateStats(len(token_ids), 0, time.perf_counter() - began)

    def release(self) -> None:
        self.pool.release(self.blocks)
        self.blocks, self._free, self.slots, self.token_ids = [], [], [], []

    # ---- edits ---------------------------------------------------------------------------------
    def replace(self, start: int, end: int, new_ids: list[int], mode: UpdateMode = UpdateMode.PIE) -> UpdateStats:
        """Tokens [start, end) become new_ids; KV updated by `mode`."""
        began = time.perf_counter()
        if mode == UpdateMode.FULL:
            stats = self.encode([*self.token_ids[:start], *new_ids, *self.token_ids[end:]])
            return UpdateStats(stats.tokens_encoded, 0, time.perf_counter() - began)
        if mode == UpdateMode.SUFFIX:
            suffix = [*new_ids, *self.token_ids[end:]]
            self._truncate(start)
            self._encode_at(start, suffix)
            return UpdateStats(len(suffix), 0, time.perf_counter() - began)
        delta = len(new_ids) - (end - start)
        later_slots = self.slots[end:]
        self._free += self.slots[start:end]
        self.token_ids[start:end], self.slots[start:end] = [], []
        self._shift(later_slots, delta, rotate=mode == UpdateMode.PIE)
        self._insert_encoded(start, list(new_ids))
        return UpdateStats(len(new_ids), len(later_slots), time.perf_counter() - began)

    # ---- prediction ----------------------------------------------------------------------------
    def predict(self, prefix_tokens: int, extra_ids: list[int], max_tokens: int,
                stop_ids: set[int], stop_when=None) -> list[int]:
        """Greedy tokens continuing the first `prefix_tokens` tokens (+ extra_ids, e.g. the part of a
        token before the cursor). Later tokens stay cached but invisible; nothing cached is changed.
        `stop_when(generated_ids)` may end early (a finished line)."""
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
                logits = self._forward(feed, list(range(position, position + len(feed))), slots, visible, last_only=True)
                visible, position = visible + slots, position + len(feed)
                token = int(torch.argmax(logits[-1]))
                if token in stop_ids:
                    break
                generated.append(token)
                if stop_when and stop_when(generated):
                    break
                feed = [token]
        finally:
            self._free += scratch
        return generated

    def keys(self, layer: int) -> torch.Tensor:
        """[T, Hkv, D] cached keys of the document in token order (tests, diagnostics)."""
        return self.cache.k[layer, torch.tensor(self.slots, dtype=torch.int64)]

    def positions(self) -> list[int]:
        return self.cache.positions[torch.tensor(self.slots, dtype=torch.int64)].tolist()

    # ---- internals -----------------------------------------------------------------------------
    def _encode_at(self, start: int, token_ids: list[int]) -> None:
        """Append token_ids at positions start.. (the document must have exactly `start` tokens)."""
        assert len(self.token_ids) == start
        for lo in range(0, len(token_ids), self.chunk_tokens):
            chunk = token_ids[lo: lo + self.chunk_tokens]
            slots = self._take(len(chunk))
            positions = list(range(start + lo, start + lo + len(chunk)))
            self._forward(chunk, positions, slots, list(self.slots), last_only=None)
            self.token_ids += chunk
            self.slots += slots

    def _insert_encoded(self, start: int, new_ids: list[int]) -> None:
        """Encode new_ids at positions start.. against the prefix only, and splice them in."""
        new_slots: list[int] = []
        for lo in range(0, len(new_ids), self.chunk_tokens):
            chunk = new_ids[lo: lo + self.chunk_tokens]
            slots = self._take(len(chunk))
            positions = list(range(start + lo, start + lo + len(chunk)))
            self._forward(chunk, positions, slots, self.slots[:start] + new_slots, last_only=None)
            new_slots += slots
        self.token_ids[start:start] = new_ids
        self.slots[start:start] = new_slots

    def _truncate(self, keep: int) -> None:
        self._free += self.slots[keep:]
        del self.token_ids[keep:], self.slots[keep:]

    def _shift(self, slots: list[int], delta: int, rotate: bool) -> None:
        """Move cached tokens by `delta` positions: position ids always, keys only when `rotate`."""
        if not slots or delta == 0:
            return
        index = torch.tensor(slots, dtype=torch.int64, device=self.cache.k.device)
        self.cache.positions[index] += delta
        if rotate:
            keys = self.cache.k[:, index]  # [L, T, Hkv, D]
            layers, t = keys.shape[:2]
            moved = rotate_keys_by(keys.reshape(layers * t, *keys.shape[2:]), delta, self.runner.model.inv_freq)
            self.cache.k[:, index] = moved.view_as(keys)

    def _take(self, n: int) -> list[int]:
        """n free slots, allocating blocks from the shared pool when the document's own run out."""
        bs = self.cache.block_size
        missing = n - len(self._free)
        if missing > 0:
            need = blocks_for(missing, bs)
            if not self.pool.can_allocate(need):
                raise CapacityError(f"KV cache is full: {need} more blocks needed for this document")
            for block in self.pool.allocate(need):
                self.blocks.append(block)
                self._free += range(block * bs, (block + 1) * bs)
        taken, self._free = self._free[:n], self._free[n:]
        return taken

    def _forward(self, token_ids, positions, new_slots, visible_slots, last_only) -> torch.Tensor | None:
        """One forward pass of token_ids at positions, writing their K/V to new_slots, attending to
        visible_slots + themselves (causally by position). Logits of the last row when last_only."""
        device = self.runner.device
        ids = torch.tensor(token_ids, dtype=torch.int64, device=device)
        pos = torch.tensor(positions, dtype=torch.int64, device=device)
        kv = torch.tensor([*visible_slots, *new_slots], dtype=torch.int64, device=device)
        segment = Segment("document", slice(0, len(token_ids)), kv)
        meta = LocalStepMeta(torch.tensor(new_slots, dtype=torch.int64, device=device), pos, [segment], {})
        self.runner.backend.prepare(meta)
        rows = torch.tensor([len(token_ids) - 1] if last_only else [], dtype=torch.int64, device=device)
        return self.runner.model(ids, pos, self.runner.backend, meta, rows)
