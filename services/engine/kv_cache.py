"""The paged KV cache of one worker, and the local attention backend that reads it.

Storage is flat slots (slot = block_id * block_size + offset) per layer. Every slot also stores the
position id of the token whose K/V it holds: causal visibility is `key_pos <= query_pos` within a
request, never storage order, so a request's KV can sit in any blocks in any order, and an edit (PIE)
can re-position keys in place. Block ids come from the scheduler; this module only obeys them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from longbow.ringattn.local import block_attention
from longbow.ringattn.rope import rotate_keys_by
from longbow.services.engine.model import AttentionBackend, ModelArgs


class PagedKVCache:
    def __init__(self, args: ModelArgs, num_blocks: int, block_size: int, device, dtype):
        self.block_size = block_size
        slots = num_blocks * block_size
        shape = (args.n_layers, slots, args.n_kv_heads, args.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # [L, S, Hkv, D]
        self.v = torch.zeros(shape, device=device, dtype=dtype)  # [L, S, Hkv, D]
        self.positions = torch.full((slots,), -1, dtype=torch.int64, device=device)  # [S]
        self.version = 0  # bumped by every change to stored K/V other than a step's own writes

    def shift(self, slots: torch.Tensor, delta: int, inv_freq: torch.Tensor, rotate: bool = True) -> None:
        """PIE: move the tokens in `slots` by `delta` positions. Position ids always; keys re-rotated by
        delta in every layer at once when `rotate` (values never change)."""
        if slots.numel() == 0 or delta == 0:
            return
        self.positions[slots] += delta
        self.version += 1
        if rotate:
            keys = self.k[:, slots]  # [L, T, Hkv, D]
            moved = rotate_keys_by(keys.reshape(-1, *keys.shape[2:]), delta, inv_freq)  # [L*T, Hkv, D]
            self.k[:, slots] = moved.view_as(keys)

    def copy(self, source: torch.Tensor, target: torch.Tensor) -> None:
        """K, V and position ids of `source` slots into `target` slots (a forked document)."""
        self.version += 1
        for table in (self.k, self.v):
            table[:, target] = table[:, source]
        self.positions[target] = self.positions[source]


@dataclass
class Segment:
    """One request's rows in the step batch and the slots of all its KV (new tokens included)."""

    request_id: str
    rows: slice  # rows of the step's flattened token batch
    kv_slots: torch.Tensor  # [Tk]
    host_kv_slots: np.ndarray  # [Tk] the same slots on the host (ranges and batching are decided there)
    want_attention: bool = False
    in_order: bool = False  # the keys are positions 0..Tk-1 in list order (no edits, one shard)
    # Filled by prepare(), shared by all layers:
    kv_range: slice | None = None  # the slots as a slice when contiguous: gather becomes a view
    visible: torch.Tensor | None = None  # [Tq, Tk] causal mask; None when every key is visible
    batched: bool = False  # attended in the step's batched decode call
    flash_causal: bool = False  # a long in-order chunk: lower-right causal on flash pieces (block_attention)


@dataclass
class DecodeBatch:
    """Decode rows (one query each, every listed key visible) attended together in one call per layer:
    their KV gathered into [B, L] (padded, `valid` marks real keys)."""

    rows: torch.Tensor  # [B] rows of the step batch
    index: torch.Tensor  # [B, L] local slots (padding: slot 0)
    valid: torch.Tensor | None  # [B, 1, 1, L] bool; None when every row has L keys
    mirror: "DecodeMirror | None" = None  # where the gathered KV is kept between steps (CPU)
    append_at: torch.Tensor | None = None  # [B] each row's new key as a row of the mirror's [B * capacity]
    ids: tuple[str, ...] = ()  # the rows' request ids
    host_index: np.ndarray | None = None  # `index` on the host
    lengths: np.ndarray | None = None  # [B] keys per row


@dataclass
class DecodeMirror:
    """The decode batch's keys and values as gathered for the last step, kept for the next one: when the
    next step decodes the same requests, each with one more key and nothing else it reads rewritten, only
    the new column is written instead of gathering every key again (CPU)."""

    ids: tuple[str, ...]
    index: np.ndarray  # [B, L] host slots the mirror holds (padding 0)
    lengths: np.ndarray  # [B]
    k: torch.Tensor  # [n_layers, B, capacity, Hkv, D]
    v: torch.Tensor
    version: int  # the cache's version when filled
    filled: bool = False  # every layer holds `index`'s keys (the step that filled it ran to the end)


@dataclass
class LocalStepMeta:
    slots: torch.Tensor  # [T] where each new token's K/V goes
    positions: torch.Tensor  # [T]
    segments: list[Segment]
    attention_rows: dict[str, torch.Tensor]  # filled at the last layer: request id -> [Tk] probs
    decode_batch: DecodeBatch | None = None
    row_start: np.ndarray | None = None  # [B + 1] host: segment b owns rows row_start[b]:row_start[b + 1]
    kv_start: np.ndarray | None = None  # [B + 1] host: segment b's keys are all_kv_slots[kv_start[b]:...]
    all_kv_slots: torch.Tensor | None = None  # [N] every segment's slots, concatenated (the segments' views)


class LocalPagedAttention(AttentionBackend):
    """All KV on this device. Writes new K/V into their slots, then attends: decode rows together in one
    call per layer (when batching them measured faster), prefill chunks one call each."""

    # NOTE: batching decodes pads every row to the longest KV; past 2x padding overhead the per-request
    # calls on views of contiguous KV win on this CPU, so mixed lengths fall back.
    max_padding_ratio = 2.0
    # NOTE: a prefill chunk's lower-right causal mask goes to CPU SDPA as a boolean tensor, with 4-D
    # inputs ([1, H, T, D]: 3-D ones measured 2-25x slower, GQA included); ringattn's block_attention runs
    # the same chunk as full + square-causal pieces on the CPU flash kernel, which pays off only for big
    # chunks over many keys. Measured (fp32, 2 cores, ms per layer, 4-D mask vs pieces): 2 x 2048 0.40 vs
    # 0.69, 32 x 1024 0.64 vs 0.97, 248 x 380 1.77 vs 2.39, 512 x 2048 19.3 vs 21.3, 32 x 8000 5.96 vs 5.60;
    # 128 x 16000 64.7 vs 52.3, 256 x 8000 43.3 vs 37.8, 512 x 4096 47.5 vs 40.6.
    min_flash_rows, min_flash_keys = 128, 4096  # both
    # NOTE: gathering a decode batch's KV was ~14% of a CPU decode step (8 requests x 420 keys: 8.8 of 61
    # ms over 30 layers), the same bytes every step but one column; the mirror keeps them, at most half
    # the cache's own memory again.
    max_mirror_fraction = 0.5

    def __init__(self, cache: PagedKVCache, n_layers: int):
        self.cache, self.last_layer = cache, n_layers - 1
        self.mirror: DecodeMirror | None = None
        self.mirrors = cache.k.device.type == "cpu"  # on a GPU the gather is cheap next to the memory

    def _flash_pieces(self, n_rows: int, n_keys: int) -> bool:
        """Whether an in-order chunk of n_rows > 1 over n_keys keys runs faster as flash pieces (CPU)."""
        return n_rows >= self.min_flash_rows and n_keys >= self.min_flash_keys

    def prepare(self, meta: LocalStepMeta) -> LocalStepMeta:
        """Once per step: store positions, and per request the causal mask and slot range all layers share."""
        self.cache.positions[meta.slots] = meta.positions
        decodes = []
        for seg in meta.segments:
            n_rows, n_keys = seg.rows.stop - seg.rows.start, int(seg.kv_slots.numel())
            seg.kv_range = _as_range(seg.host_kv_slots)
            if seg.in_order:
                # Keys are positions 0..Tk-1 in list order: the chunk's rows are its last positions,
                # so a single row (decode) sees every key and a chunk needs the lower-right causal mask.
                if n_rows > 1 and self._flash_pieces(n_rows, n_keys) and meta.positions.device.type == "cpu":
                    seg.flash_causal = True
                elif n_rows > 1:
                    key_pos = torch.arange(n_keys, device=meta.positions.device)
                    seg.visible = key_pos.unsqueeze(0) <= meta.positions[seg.rows].unsqueeze(1)  # [Tq, Tk]
                elif n_rows == 1 and n_keys:
                    decodes.append(seg)
                continue
            q_pos, k_pos = meta.positions[seg.rows], self.cache.positions[seg.kv_slots]
            # NOTE: a boolean mask sends SDPA down its slow general path (~18% of a step when it was
            # built per layer); decode rows see every cached key, so they need none.
            if q_pos.numel() and k_pos.numel() and int(k_pos.max()) > int(q_pos.min()):
                seg.visible = k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)  # [Tq, Tk]
        meta.decode_batch = self._decode_batch(decodes, meta.positions.device)
        self._attach_mirror(meta)
        return meta

    def _decode_batch(self, decodes: list[Segment], device) -> DecodeBatch | None:
        # One decode row is a batch of its own only where its keys are not a range (a view needs no
        # gather) and the CPU mirror can keep them gathered.
        if not decodes or (len(decodes) == 1 and (decodes[0].kv_range is not None or not self.mirrors)):
            return None
        lengths = np.array([len(seg.host_kv_slots) for seg in decodes])
        longest = int(lengths.max())
        if longest * len(decodes) > self.max_padding_ratio * lengths.sum():
            return None
        index = np.zeros((len(decodes), longest), dtype=np.int64)
        for i, seg in enumerate(decodes):
            index[i, :lengths[i]] = seg.host_kv_slots
            seg.batched = True
        valid = None
        if (lengths != longest).any():
            valid = torch.from_numpy(np.arange(longest)[None, :] < lengths[:, None]).to(device)[:, None, None, :]
        rows = torch.tensor([seg.rows.start for seg in decodes], dtype=torch.int64, device=device)
        return DecodeBatch(rows, torch.from_numpy(index).to(device), valid,
                           ids=tuple(seg.request_id for seg in decodes), host_index=index, lengths=lengths)

    def _attach_mirror(self, meta: LocalStepMeta) -> None:
        """Keep (append to) or refill the decode mirror for this step's batch, or drop it."""
        batch, previous, cache = meta.decode_batch, self.mirror, self.cache
        self.mirror = None
        if batch is None or not self.mirrors:
            return
        longest = batch.host_index.shape[1]
        if previous is None or not self._extends(previous, batch, meta):
            batch.mirror = self.mirror = self._new_mirror(batch, capacity=longest + 64)
            return
        mirror = previous
        if longest > previous.k.shape[2]:
            mirror = self._new_mirror(batch, capacity=2 * longest)
            if mirror is None:
                return
            mirror.k[:, :, :previous.k.shape[2]] = previous.k
            mirror.v[:, :, :previous.v.shape[2]] = previous.v
        capacity = mirror.k.shape[2]
        batch.append_at = torch.from_numpy(np.arange(len(previous.lengths)) * capacity + previous.lengths)
        mirror.ids, mirror.index, mirror.lengths, mirror.filled = batch.ids, batch.host_index, batch.lengths, False
        batch.mirror = self.mirror = mirror

    def _extends(self, mirror: DecodeMirror, batch: DecodeBatch, meta: LocalStepMeta) -> bool:
        """Whether this batch is the mirror's requests with one new key each and every key the mirror
        holds unchanged since (no shift or copy, no slot of it written by this step)."""
        if not (mirror.filled and mirror.version == self.cache.version and mirror.ids == batch.ids
                and np.array_equal(batch.lengths, mirror.lengths + 1)):
            return False
        old_len = mirror.index.shape[1]
        held = np.arange(old_len)[None, :] < mirror.lengths[:, None]  # [B, L_old]
        if not np.array_equal(batch.host_index[:, :old_len][held], mirror.index[held]):
            return False
        written = meta.slots.numpy()
        return not np.isin(written, mirror.index[held]).any()

    def _new_mirror(self, batch: DecodeBatch, capacity: int) -> DecodeMirror | None:
        cache = self.cache
        shape = (cache.k.shape[0], batch.host_index.shape[0], capacity, *cache.k.shape[2:])
        if 2 * np.prod(shape) > self.max_mirror_fraction * 2 * cache.k.numel():
            return None
        # zeros: a padded row's unused columns must hold finite numbers (SDPA weighs them by 0, not skips)
        return DecodeMirror(batch.ids, batch.host_index, batch.lengths, torch.zeros(shape, dtype=cache.k.dtype),
                            torch.zeros(shape, dtype=cache.v.dtype), cache.version)

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, meta: LocalStepMeta) -> None:
        """Write the step's new K/V [T, Hkv, D] into their slots."""
        self.cache.k[layer, meta.slots] = k
        self.cache.v[layer, meta.slots] = v

    def attend(self, layer, q, k, v, meta: LocalStepMeta) -> torch.Tensor:
        cache = self.cache
        self.store(layer, k, v, meta)
        out = torch.empty_like(q)  # [T, Hq, D]
        batch = meta.decode_batch
        if batch is not None:
            keys, values = self._decode_keys(layer, k, v, batch)  # [B, L, Hkv, D]
            out[batch.rows] = _decode_attention(q[batch.rows], keys, values, batch.valid)
        for seg in meta.segments:
            want_row = seg.want_attention and layer == self.last_layer
            if seg.batched and not want_row:
                continue
            if seg.kv_range is not None:  # a view
                keys, values = cache.k[layer, seg.kv_range], cache.v[layer, seg.kv_range]  # [Tk, Hkv, D]
            else:  # NOTE: index_select measured 2-10x faster than advanced indexing (6k slots, 30 layers)
                keys = cache.k[layer].index_select(0, seg.kv_slots)
                values = cache.v[layer].index_select(0, seg.kv_slots)
            if seg.flash_causal:
                q_pos = meta.positions[seg.rows]
                out[seg.rows] = block_attention(q[seg.rows], keys, values, q_pos,
                                                torch.arange(keys.shape[0], device=q.device), causal=True)[0].to(q.dtype)
            elif not seg.batched and seg.visible is None and seg.rows.stop - seg.rows.start == 1:
                out[seg.rows] = _decode_attention(q[seg.rows], keys[None], values[None], None)
            elif not seg.batched:
                # NOTE: torch's SDPA with enable_gqa keeps KV heads unexpanded; on this CPU it measured
                # 1.6-2x faster than ringattn's einsum block_attention for 256-512-token chunks and no
                # slower for decode. lse is not needed when all KV is local. 4-D, as noted above.
                out[seg.rows] = F.scaled_dot_product_attention(
                    q[seg.rows].transpose(0, 1)[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None],
                    attn_mask=seg.visible, enable_gqa=True,
                )[0].transpose(0, 1)
            if want_row:
                last_visible = seg.visible[-1] if seg.visible is not None else torch.ones(
                    keys.shape[0], dtype=torch.bool, device=keys.device)
                meta.attention_rows[seg.request_id] = _last_row_attention(q[seg.rows][-1], keys, last_visible)
        return out

    def _decode_keys(self, layer: int, k: torch.Tensor, v: torch.Tensor, batch: DecodeBatch):
        """The batch's keys and values [B, L, Hkv, D]: the mirror's, with this step's new ones written
        in, or gathered from the cache (into the mirror when there is one)."""
        cache, mirror = self.cache, batch.mirror
        length = batch.index.shape[1]
        if mirror is not None and batch.append_at is not None:
            for table, new in ((mirror.k, k), (mirror.v, v)):
                table[layer].view(-1, *table.shape[3:]).index_copy_(0, batch.append_at, new[batch.rows])
        else:
            # NOTE: index_select on the flat index measured ~5x faster than advanced indexing with [B, L].
            flat, shape = batch.index.view(-1), (*batch.index.shape, *cache.k.shape[2:])
            keys = cache.k[layer].index_select(0, flat).view(shape)
            values = cache.v[layer].index_select(0, flat).view(shape)
            if mirror is None:
                return keys, values
            mirror.k[layer, :, :length], mirror.v[layer, :, :length] = keys, values
        if layer == self.last_layer:
            mirror.filled = True
        return mirror.k[layer, :, :length], mirror.v[layer, :, :length]


def _as_range(slots: np.ndarray) -> slice | None:
    """slots as a slice when they are consecutive (blocks allocated back to back), else None."""
    n = len(slots)
    if n == 0:
        return None
    first, last = int(slots[0]), int(slots[-1])
    if last - first + 1 == n and bool((np.diff(slots) == 1).all()):
        return slice(first, last + 1)
    return None



def _decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      valid: torch.Tensor | None) -> torch.Tensor:
    """One query row per sequence that sees all its keys: q [B, Hq, D] over keys, values [B, L, Hkv, D]
    (valid [B, 1, 1, L] marks real keys, None: all). The query heads that share a KV head go to SDPA as
    that head's rows ([B, Hkv, group, D]), so no KV head is repeated and no GQA path runs."""
    # NOTE: measured on CPU (fp32, 2 threads, per layer): 8 x 420 keys 244 -> 147 us, 8 x 1000 617 ->
    # 399, 32 x 420 1014 -> 614, 4 x 4000 2492 -> 1001 against enable_gqa with [B, Hq, 1, D]; equal
    # within 7e-7. Query head h reads KV head h // group, as in transformers' repeat_kv.
    b, h_q, d = q.shape
    h_kv = keys.shape[2]
    out = F.scaled_dot_product_attention(
        q.reshape(b, h_kv, h_q // h_kv, d), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=valid)
    return out.reshape(b, h_q, d)


def _last_row_attention(q_row: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Head-averaged attention probabilities [Tk] of one query row [Hq, D] over keys [Tk, Hkv, D]."""
    h_q, d = q_row.shape
    group = h_q // keys.shape[1]
    k_full = keys.float().repeat_interleave(group, dim=1)  # [Tk, Hq, D]
    scores = torch.einsum("hd,khd->hk", q_row.float(), k_full) / d**0.5  # [Hq, Tk]
    scores = scores.masked_fill(~visible.unsqueeze(0), float("-inf"))
    return scores.softmax(-1).mean(0)


class NoCacheAttention(AttentionBackend):
    """Causal attention of one sequence over itself, nothing cached (meta: positions [T]).
    For full-sequence forwards: reference checks and one-shot scoring."""

    def attend(self, layer, q, k, v, meta: torch.Tensor) -> torch.Tensor:
        out, _ = block_attention(q, k, v, meta, meta, causal=True)
        return out.to(q.dtype)
