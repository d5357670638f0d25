"""Block attention on one device, returning (out, lse) so partial results can be merged.

Causal masking compares position ids, never storage order: a key is visible to a query when
`key_pos <= query_pos` (and, for ragged batches, both belong to the same sequence). This is what lets
KV of one request live on any shard in any order, and what lets PIE re-position keys in place.
GQA is native: KV heads are never expanded, query heads are grouped over them.

Under a causal mask the block is cut into tiles (up to KEY_TILE keys by as many query rows as fit in
TILE_SCORES); tiles whose keys all lie after every query are skipped and tiles whose keys all lie
before every query run without a mask. This works for any position layout: contiguous and zigzag
shards skip about half of a diagonal block, a random permutation skips nothing and stays exact.
`computed_pairs` counts the (query, key) pairs that are actually computed, which is what the cost model charges as FLOPs.

Fast path: when the visible pairs of a block are whole rectangles or square causal diagonals (every key
before every query, or q and k holding runs of consecutive positions, as contiguous and zigzag shards
do), those pieces go to torch's flash-class kernels, which return the log-sum-exp too, and are merged
exactly like ring hops. Callers that know the shape of the mask say so with `mask=` and skip the
inspection (a host sync on CUDA); anything else (PIE-moved keys, ragged sequence ids) takes the exact
tiled path above.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F

from longbow.ringattn.merge import merge_partials

log = logging.getLogger(__name__)

# What the caller knows about the mask between a query block and a key block:
# "full": every key is visible to every query (non-causal, or every key position <= every query position);
# "causal_diagonal": q and k hold the same run of consecutive positions (key_pos <= query_pos is
#   j <= i, i.e. a square causal block);
# "positions": arbitrary positions, always the exact path;
# None: inspect the positions (one host sync on CUDA) and take the fast path where it applies.
MaskKind = Literal["full", "causal_diagonal", "positions"]

# NOTE: 2**22 fp32 scores per tile keeps one tile's scratch (scores + probabilities) near 32 MiB, so a
# 16k x 16k block with 9 heads runs on a laptop; on CPU the tile size barely moves the FLOP rate.
TILE_SCORES = 1 << 22
KEY_TILE = 1024


def visibility_mask(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    causal: bool,
    q_seq: torch.Tensor | None = None,
    k_seq: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Boolean [Tq, Tk] mask of visible keys, or None when every key is visible."""
    mask = None
    if causal:
        mask = k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)
    if q_seq is not None and k_seq is not None:
        same = k_seq.unsqueeze(0) == q_seq.unsqueeze(1)
        mask = same if mask is None else mask & same
    return mask


def _dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One tile: q [Tq, Hq, D], k/v [Tk, Hkv, D], mask [Tq, Tk] or None -> out [Tq, Hq, D], lse [Tq, Hq]."""
    t_q, h_q, d = q.shape
    h_kv = k.shape[1]
    group = h_q // h_kv
    qg = q.float().reshape(t_q, h_kv, group, d).permute(1, 2, 0, 3).reshape(h_kv, group * t_q, d)
    scores = torch.bmm(qg, k.float().permute(1, 2, 0)).mul_(scale)  # [Hkv, G*Tq, Tk]
    scores = scores.view(h_kv, group, t_q, -1)  # [Hkv, G, Tq, Tk]
    if mask is not None:
        scores.masked_fill_(~mask, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)  # [Hkv, G, Tq]
    safe_lse = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    probs = scores.sub_(safe_lse.unsqueeze(-1)).exp_()  # rows with no visible key are all zero
    out = torch.bmm(probs.view(h_kv, group * t_q, -1), v.float().transpose(0, 1))  # [Hkv, G*Tq, D]
    out = out.view(h_kv, group, t_q, d).permute(2, 0, 1, 3).reshape(t_q, h_q, d)
    return out, lse.permute(2, 0, 1).reshape(t_q, h_q)


def _position_range(pos: list[int], start: int, end: int) -> tuple[int, int]:
    window = pos[start:end]
    return min(window), max(window)


def causal_tiles(
    q_pos: torch.Tensor, k_pos: torch.Tensor, heads_q: int
) -> Iterator[tuple[slice, slice, bool]]:
    """(query rows, key rows, needs_mask) for every causal tile with at least one visible key."""
    q_list, k_list = q_pos.tolist(), k_pos.tolist()
    rows = max(1, TILE_SCORES // (heads_q * KEY_TILE))
    key_tiles = [
        (start, min(start + KEY_TILE, len(k_list)), *_position_range(k_list, start, start + KEY_TILE))
        for start in range(0, len(k_list), KEY_TILE)
    ]
    for q_start in range(0, len(q_list), rows):
        q_end = min(q_start + rows, len(q_list))
        q_min, q_max = _position_range(q_list, q_start, q_end)
        for k_start, k_end, k_min, k_max in key_tiles:
            if k_min <= q_max:
                yield slice(q_start, q_end), slice(k_start, k_end), k_max > q_min


def computed_pairs(q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool, heads_q: int = 1) -> int:
    """Query-key pairs block_attention computes (tiles it skips are not counted)."""
    t_q, t_k = q_pos.shape[0], k_pos.shape[0]
    if not causal or t_q == 0 or t_k == 0:
        return t_q * t_k
    return sum((q.stop - q.start) * (k.stop - k.start) for q, k, _ in causal_tiles(q_pos, k_pos, heads_q))


def _rows_per_tile(heads_q: int, t_k: int) -> int:
    return max(1, TILE_SCORES // max(1, heads_q * t_k))


# NOTE: measured on the shared 2-core CPU (torch 2.13, 9 q / 3 KV heads, d 64, fp32, best of n, fast vs
# exact tiles): 1 decode row x 2k keys 0.32 vs 0.54 ms, 8 x 2k 0.53 vs 1.05, 70 x 70 causal 0.28 vs 0.50,
# 512 causal 20 vs 247, 2k causal 296 vs 2,056, 2k full 406 vs 2,147; out within 1.2e-6, lse within 1e-6.
# Faster at every size and exact in fp32, so CPU takes the fast path too, not only CUDA.
FAST_PATH_DEVICES = {"cuda", "cpu"}
# NOTE: more run pairs than this is closer to a shuffled layout than to shards of contiguous text; one
# exact tiled pass beats dozens of small kernel calls and merges there.
MAX_RUN_PAIRS = 16

Piece = tuple[slice, slice, bool]  # (query rows, key rows, square causal block) for one kernel call

# (device type, dtype, head dim) whose fast kernel raised once: the exact path serves it from then on.
_broken_kernels: set[tuple[str, torch.dtype, int]] = set()
_cpu_native_gqa = True  # flipped if this torch's CPU flash kernel wants as many KV heads as q heads


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(0, 1).unsqueeze(0)  # [T, H, D] -> [1, H, T, D]


def _cuda_kernel(q, k, v, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    group = q.shape[1] // k.shape[1]
    k, v = k.to(q.dtype), v.to(q.dtype)
    if group > 1:  # the flash op takes as many KV heads as query heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    qh, kh, vh = _heads_first(q), _heads_first(k), _heads_first(v)
    # Signatures, the same on torch 2.11 and 2.13 (only the leading outputs are used):
    # _scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, return_debug_mask, *, scale)
    #   -> (out, logsumexp [B, H, Tq], ...); fp16/bf16 only.
    # _scaled_dot_product_efficient_attention(q, k, v, attn_bias, compute_log_sumexp, dropout_p, is_causal,
    #   *, scale) -> (out, log_sumexp [B, H, Tq rounded up to 32], ...); takes fp32 too.
    if q.dtype in (torch.float16, torch.bfloat16):
        result = torch.ops.aten._scaled_dot_product_flash_attention(qh, kh, vh, 0.0, causal, scale=scale)
    else:
        result = torch.ops.aten._scaled_dot_product_efficient_attention(
            qh, kh, vh, None, True, 0.0, causal, scale=scale
        )
    return result[0], result[1]


def _cpu_kernel(q, k, v, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    global _cpu_native_gqa
    # NOTE: fp32 inputs even for bf16 blocks: it keeps the result within 1e-6 of the exact path (which
    # computes in fp32) and measured no slower than the kernel's own bf16 path on this CPU.
    q, k, v = q.float(), k.float(), v.float()
    # (q, k, v, dropout_p, is_causal, *, attn_mask, scale) -> (out, logsumexp [B, H, Tq])
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if _cpu_native_gqa:
        try:
            result = op(_heads_first(q), _heads_first(k), _heads_first(v), 0.0, causal, scale=scale)
            return result[0], result[1]
        except RuntimeError:
            _cpu_native_gqa = False
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    result = op(_heads_first(q), _heads_first(k), _heads_first(v), 0.0, causal, scale=scale)
    return result[0], result[1]


def _flash_kernel(q, k, v, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One flash-class call: q [Tq, Hq, D], k/v [Tk, Hkv, D] -> (out [Tq, Hq, D], lse [Tq, Hq]) fp32.

    causal means a square block where key j is visible to query i when j <= i. None: no kernel here.
    """
    t_q, _, d = q.shape
    kind = (q.device.type, q.dtype, d)
    if kind in _broken_kernels:
        return None
    kernel = _cuda_kernel if q.device.type == "cuda" else _cpu_kernel
    try:
        out, lse = kernel(q, k, v, causal, scale)  # [1, Hq, Tq, D], [1, Hq, >=Tq]
    except RuntimeError as error:  # e.g. a head dim or GPU the kernel does not support
        _broken_kernels.add(kind)
        log.warning("flash-class attention unavailable for %s, using the exact path: %s", kind, error)
        return None
    # contiguous like the exact path's results: ring transports send these partials as they are
    return out[0].transpose(0, 1).float().contiguous(), lse[0, :, :t_q].transpose(0, 1).float().contiguous()


def _runs(pos: torch.Tensor) -> list[tuple[int, int, int]]:
    """Runs of consecutive positions in pos [T] (on the host): (first row, end row, first position)."""
    breaks = (torch.nonzero(pos[1:] - pos[:-1] != 1).flatten() + 1).tolist()
    starts, ends = [0, *breaks], [*breaks, pos.numel()]
    return list(zip(starts, ends, pos[starts].tolist()))


def _run_pair_pieces(q_run: tuple[int, int, int], k_run: tuple[int, int, int]) -> list[Piece]:
    """The visible (query, key) pairs of one q run and one k run as full or square causal pieces."""
    (qa, qb, qs), (ka, kb, ks) = q_run, k_run
    qe, ke = qs + qb - qa, ks + kb - ka  # exclusive position ends
    pieces = []
    older = min(ke, qs) - ks  # keys before every query: visible to all of them
    if older > 0:
        pieces.append((slice(qa, qb), slice(ka, ka + older), False))
    d0, d1 = max(qs, ks), min(qe, ke)  # positions both runs hold: a square causal diagonal
    if d0 < d1:
        pieces.append((slice(qa + d0 - qs, qa + d1 - qs), slice(ka + d0 - ks, ka + d1 - ks), True))
    if ke < qe and d0 < ke:  # queries after the last key see every key of the diagonal
        pieces.append((slice(qa + ke - qs, qb), slice(ka + d0 - ks, kb), False))
    return pieces


def kernel_pieces(
    q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool, mask: MaskKind | None
) -> list[Piece] | None:
    """Kernel calls that cover exactly the visible pairs of the block, or None for the exact path."""
    t_q, t_k = q_pos.shape[0], k_pos.shape[0]
    everything = (slice(0, t_q), slice(0, t_k), False)
    if mask not in (None, "full", "causal_diagonal", "positions"):
        raise ValueError(f"unknown mask kind {mask!r}")
    if mask == "positions":
        return None
    if not causal or mask == "full":
        return [everything]
    if mask == "causal_diagonal":
        if t_q != t_k:
            raise ValueError(f"a causal diagonal block is square, got {t_q} queries and {t_k} keys")
        return [(slice(0, t_q), slice(0, t_k), True)]
    positions = torch.cat([q_pos, k_pos]).cpu()  # NOTE: the one host sync of a call without a hint
    q_runs, k_runs = _runs(positions[:t_q]), _runs(positions[t_q:])
    if len(q_runs) * len(k_runs) > MAX_RUN_PAIRS:
        return None
    return [piece for q_run in q_runs for k_run in k_runs for piece in _run_pair_pieces(q_run, k_run)]


def _fast_attention(q, k, v, pieces: list[Piece], scale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    t_q, h_q, d = q.shape
    if len(pieces) == 1 and pieces[0][0] == slice(0, t_q):  # one call covers every row: no merge
        _, keys, causal = pieces[0]
        return _flash_kernel(q, k[keys], v[keys], causal, scale)
    out = q.new_zeros(t_q, h_q, d, dtype=torch.float32)
    lse = q.new_full((t_q, h_q), -math.inf, dtype=torch.float32)
    for rows, keys, causal in pieces:
        part = _flash_kernel(q[rows], k[keys], v[keys], causal, scale)
        if part is None:
            return None
        out[rows], lse[rows] = merge_partials(out[rows], lse[rows], *part)
    return out, lse


def block_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    causal: bool = True,
    q_seq: torch.Tensor | None = None,
    k_seq: torch.Tensor | None = None,
    scale: float | None = None,
    mask: MaskKind | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q over (k, v) with its log-sum-exp.

    q: [Tq, Hq, D]; k, v: [Tk, Hkv, D] with Hq % Hkv == 0; q_pos: [Tq], k_pos: [Tk] (int64).
    mask: what the caller knows about visibility (see MaskKind); None inspects the positions.
    Returns out: [Tq, Hq, D] fp32 (zeros where no key is visible) and lse: [Tq, Hq] fp32 (-inf there),
    lse in natural log of the scaled scores.
    """
    t_q, h_q, d = q.shape
    t_k = k.shape[0]
    if t_k == 0 or t_q == 0:
        empty_out = q.new_zeros(t_q, h_q, d, dtype=torch.float32)
        return empty_out, q.new_full((t_q, h_q), -math.inf, dtype=torch.float32)
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    if q_seq is None and q.device.type in FAST_PATH_DEVICES:
        pieces = kernel_pieces(q_pos, k_pos, causal, mask)
        fast = _fast_attention(q, k, v, pieces, scale) if pieces is not None else None
        if fast is not None:
            return fast
    return _exact_attention(q, k, v, q_pos, k_pos, causal, q_seq, k_seq, scale)


def _exact_attention(
    q, k, v, q_pos, k_pos, causal: bool, q_seq, k_seq, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The tiled fp32 path for any positions (see the module docstring)."""
    t_q, h_q, d = q.shape
    t_k = k.shape[0]
    out = q.new_zeros(t_q, h_q, d, dtype=torch.float32)
    lse = q.new_full((t_q, h_q), -math.inf, dtype=torch.float32)
    if causal and q_seq is None:
        for q_rows, k_rows, needs_mask in causal_tiles(q_pos, k_pos, h_q):
            mask = visibility_mask(q_pos[q_rows], k_pos[k_rows], True) if needs_mask else None
            tile_out, tile_lse = _dense_attention(q[q_rows], k[k_rows], v[k_rows], mask, scale)
            out[q_rows], lse[q_rows] = merge_partials(out[q_rows], lse[q_rows], tile_out, tile_lse)
        return out, lse
    rows = _rows_per_tile(h_q, t_k)
    for start in range(0, t_q, rows):
        q_rows = slice(start, min(start + rows, t_q))
        seq = q_seq[q_rows] if q_seq is not None else None
        mask = visibility_mask(q_pos[q_rows], k_pos, causal, seq, k_seq)
        out[q_rows], lse[q_rows] = _dense_attention(q[q_rows], k, v, mask, scale)
    return out, lse


# ---- packed batches: the tokens of several sequences in one block --------------------------------------
# NOTE: a sequence id and a position travel as one int64 "token key" (seq * 2**32 + pos + 2**31), so a
# packed batch moves exactly as many bytes of metadata as one sequence's positions did, and every buffer
# and message of the schedules stays one tensor. Positions must lie in [-2**31, 2**31), sequence ids in
# [0, 2**31).
_POSITION_OFFSET = 1 << 31
_SEQ_SHIFT = 32


def token_keys(positions: torch.Tensor, seq: torch.Tensor | None) -> torch.Tensor:
    """[T] int64 keys carrying (sequence id, position); the positions themselves when seq is None."""
    if seq is None:
        return positions
    return (seq.to(torch.int64) << _SEQ_SHIFT) + (positions.to(torch.int64) + _POSITION_OFFSET)


def split_token_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions [T], sequence ids [T]) of packed token keys."""
    return (keys & 0xFFFFFFFF) - _POSITION_OFFSET, keys >> _SEQ_SHIFT


def _sequence_groups(seq: torch.Tensor) -> dict[int, slice | torch.Tensor]:
    """Rows of each sequence id: a slice when the id's rows are one run (packed batches are built so),
    else an index tensor."""
    values, counts = torch.unique_consecutive(seq.cpu(), return_counts=True)
    values, counts = values.tolist(), counts.tolist()
    if len(set(values)) == len(values):
        starts = itertools.accumulate(counts, initial=0)
        return {v: slice(start, start + c) for v, start, c in zip(values, starts, counts)}
    return {v: torch.nonzero(seq == v).flatten() for v in set(values)}


# NOTE: a small packed block (a decode batch: one query per sequence) is one masked dense call over all
# its keys, not one kernel call per sequence: it also computes other sequences' pairs, which below this
# many scores (query rows x keys x heads) costs less than the per-call overhead it saves. Measured (fp32,
# 9 q / 3 KV heads, d 64, 1 thread, 2 shared cores at load ~8, per call): one decode row per sequence,
# 150 keys each: 1 seq 0.13 vs 0.79 ms (dense vs per sequence), 4 seqs 0.73 vs 3.7, 8 seqs 2.6 vs 8.1;
# 8 x 400 keys (230k scores) 6.0 vs 9.2; 16 x 400 (922k) 32 vs 21; 4 x 8 rows x 150 keys (173k) 4.0 vs 3.4.
PACKED_DENSE_SCORES = 1 << 18


def packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    q_seq: torch.Tensor,
    k_seq: torch.Tensor,
    *,
    causal: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """block_attention over a packed batch: a query sees only keys of its own sequence (and, causal,
    at positions <= its own). Each sequence present on both sides is one block_attention call (so
    each takes the fast path where its positions allow); rows whose sequence has no key here stay
    zeros with lse -inf. Shapes as block_attention's."""
    t_q, h_q, d = q.shape
    out = q.new_zeros(t_q, h_q, d, dtype=torch.float32)
    lse = q.new_full((t_q, h_q), -math.inf, dtype=torch.float32)
    if t_q == 0 or k.shape[0] == 0:
        return out, lse
    if t_q * k.shape[0] * h_q <= PACKED_DENSE_SCORES:
        return _exact_attention(q, k, v, q_pos, k_pos, causal, q_seq, k_seq, 1.0 / math.sqrt(d))
    key_groups = _sequence_groups(k_seq)
    for seq, rows in _sequence_groups(q_seq).items():
        keys = key_groups.get(seq)
        if keys is None:
            continue
        out[rows], lse[rows] = block_attention(q[rows], k[keys], v[keys], q_pos[rows], k_pos[keys], causal=causal)
    return out, lse


def keyed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_keys: torch.Tensor, k_keys: torch.Tensor,
    *, causal: bool, packed: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What every schedule computes on a block: token keys are positions, or (packed) token_keys."""
    if not packed:
        return block_attention(q, k, v, q_keys, k_keys, causal=causal)
    (q_pos, q_seq), (k_pos, k_seq) = split_token_keys(q_keys), split_token_keys(k_keys)
    return packed_attention(q, k, v, q_pos, k_pos, q_seq, k_seq, causal=causal)


def computed_pairs_packed(
    q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool, heads_q: int,
    q_seq: torch.Tensor | None, k_seq: torch.Tensor | None,
) -> int:
    """computed_pairs of a block (packed: summed over the sequences packed_attention calls)."""
    if q_seq is None:
        return computed_pairs(q_pos, k_pos, causal, heads_q)
    if len(q_pos) == 0 or len(k_pos) == 0:
        return 0
    if len(q_pos) * len(k_pos) * heads_q <= PACKED_DENSE_SCORES:
        return len(q_pos) * len(k_pos)  # one dense call over every pair
    key_groups = _sequence_groups(k_seq)
    return sum(computed_pairs(q_pos[rows], k_pos[key_groups[seq]], causal, heads_q)
               for seq, rows in _sequence_groups(q_seq).items() if seq in key_groups)


def sdpa_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    causal: bool = True,
    q_seq: torch.Tensor | None = None,
    k_seq: torch.Tensor | None = None,
) -> torch.Tensor:
    """Single-device reference through torch's SDPA (KV heads expanded). Returns [Tq, Hq, D] fp32.

    Rows with no visible key are returned as zeros, matching block_attention.
    """
    h_q, h_kv = q.shape[1], k.shape[1]
    k_full = k.float().repeat_interleave(h_q // h_kv, dim=1)
    v_full = v.float().repeat_interleave(h_q // h_kv, dim=1)
    mask = visibility_mask(q_pos, k_pos, causal, q_seq, k_seq)
    if mask is None:
        mask = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool)
    out = F.scaled_dot_product_attention(
        q.float().transpose(0, 1), k_full.transpose(0, 1), v_full.transpose(0, 1), attn_mask=mask
    ).transpose(0, 1)
    empty_rows = ~mask.any(dim=1)
    return out.masked_fill(empty_rows.view(-1, 1, 1), 0.0)


def reference_lse(
    q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, *, causal: bool
) -> torch.Tensor:
    """Single-device log-sum-exp [Tq, Hq] fp32 in float64 arithmetic (KV heads expanded), for tests."""
    h_q, h_kv, d = q.shape[1], k.shape[1], q.shape[2]
    k_full = k.double().repeat_interleave(h_q // h_kv, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k_full) / math.sqrt(d)  # [Hq, Tq, Tk]
    mask = visibility_mask(q_pos, k_pos, causal)
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)
    return torch.logsumexp(scores, dim=-1).transpose(0, 1).float()
