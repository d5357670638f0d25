"""One attention call per layer for a whole engine step, over the paged, position-tagged KV cache.

A step holds decodes (one query row) and prefill chunks (many rows) of many sequences. Sequence b owns
query rows q_start[b]:q_start[b+1] and may see the keys at slots kv_slots[kv_start[b]:kv_start[b+1]], in any
order: visibility is `key_pos <= query_pos` on the position ids stored per slot, never storage order (after
a PIE edit storage order is not position order). Three pieces:

- `plan_tiles` (host, once per step, reused by every layer): cuts the step into tiles of (query rows of one
  sequence, one range of its KV list) as one small int32 table, and splits the KV of long, short-query
  sequences over several programs (flash-decoding) so a lone decode at 32k keys still fills the GPU.
- `paged_attention`: the Triton kernel, one launch per layer plus one small merge launch when some tile was
  split. It reads K/V through the slot list (no gather copy) and never synchronises with the host.
- `paged_attention_reference`: the same contract in plain torch, per sequence (tests, and the CPU path).

This file imports only torch, triton and the standard library: bench/paged_attention.py loads it by path on
a bare GPU image where this repository is not installed. Without triton the reference still imports.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference and the planner still work
    triton = None

# Tile table columns (int32): first query row, query row count, [kv_begin, kv_end) into kv_slots, and the
# workspace index of the tile's partial result (-1: the tile covers its sequence's whole KV list and
# writes `out` directly). Merge table columns (int32): first query row, query row count, first partial,
# partial count. An all-zero row (partial -1) is an empty tile / merge: padding for graph replay.
PIECE_ALIGN = 64  # split pieces are whole multiples of this many keys (a multiple of every BLOCK_N)
MAX_KV_PIECES = 64  # a split sequence has at most this many pieces: the merge takes them in one block
H200_SMS = 132


@dataclass(frozen=True)
class TilePlan:
    """The work of one step, shared by all layers. `tiles` and `merges` live on the kernel's device; the
    ints are host values, so launching from a plan needs no synchronisation."""

    tiles: torch.Tensor  # [num_tiles, 5] int32
    merges: torch.Tensor  # [num_merges, 4] int32
    group_size: int  # query heads per KV head the plan was cut for
    block_m: int  # lanes of one tile: rows_per_tile * group_size, padded to a power of two >= 16
    rows_per_tile: int
    num_partials: int  # workspace entries (split tiles)

    @property
    def num_tiles(self) -> int:
        return self.tiles.shape[0]

    @property
    def num_merges(self) -> int:
        return self.merges.shape[0]

    def to(self, device, non_blocking: bool = False) -> TilePlan:
        return replace(self, tiles=self.tiles.to(device, non_blocking=non_blocking),
                       merges=self.merges.to(device, non_blocking=non_blocking))


def plan_tiles(q_start, kv_start, *, group_size: int, num_kv_heads: int, split: bool = True,
               num_sms: int = H200_SMS, min_split_keys: int = 256, capacity: int | None = None) -> TilePlan:
    """Cut a step into tiles. q_start [B+1], kv_start [B+1]: the step's offsets on the host (lists or CPU
    tensors); the plan comes back on the CPU: move it with `.to(device)` once per step.

    A tile is at most `rows_per_tile` query rows of one sequence; a program handles one tile and one KV head
    with its `group_size` query heads packed into the rows of tl.dot. When the whole step would give fewer
    than ~4 programs per SM, sequences that fit one tile (decodes, short chunks) get their KV list split
    into pieces of >= `min_split_keys` keys, one program each, merged afterwards by log-sum-exp.
    `capacity` pads the tile table to that length and the merge table to B (empty entries do nothing) for
    CUDA-graph replay, where the grids and workspace must not change between steps."""
    # NOTE: plain Python over sequences (a step has at most a few hundred): the same plan from ~40 small
    # vectorised torch ops took 3.5x longer (1.6 ms vs 0.45 ms for 64 decodes, on a loaded 2-core host).
    q_start, kv_start = _host_list(q_start), _host_list(kv_start)
    q_len = [end - begin for begin, end in zip(q_start, q_start[1:])]
    kv_len = [end - begin for begin, end in zip(kv_start, kv_start[1:])]
    block_m, rows_per_tile = _tile_height(max(q_len, default=0), group_size)
    q_tiles = [-(-n // rows_per_tile) for n in q_len]  # 0 for a sequence with no query rows
    target = 4 * num_sms if split else 0
    piece_lens = _kv_piece_lens(q_tiles, kv_len, num_kv_heads, target, min_split_keys)

    tiles, merges, num_partials = [], [], 0  # rows of the two tables; workspace entries used
    for b, piece in enumerate(piece_lens):
        kv_begin, kv_end = kv_start[b], kv_start[b + 1]
        if piece:  # one query tile over several pieces of the KV list, adjacent in the workspace
            first = num_partials
            for begin in range(kv_begin, kv_end, piece):
                tiles.append((q_start[b], q_len[b], begin, min(begin + piece, kv_end), num_partials))
                num_partials += 1
            merges.append((q_start[b], q_len[b], first, num_partials - first))
        else:
            for row in range(q_start[b], q_start[b + 1], rows_per_tile):
                tiles.append((row, min(rows_per_tile, q_start[b + 1] - row), kv_begin, kv_end, -1))
    # Longest KV first: programs start roughly in grid order, so the long ones do not straggle at the end.
    tiles.sort(key=lambda t: t[2] - t[3])
    if capacity is not None:
        if len(tiles) > capacity:
            raise ValueError(f"step needs {len(tiles)} tiles, capacity is {capacity}")
        # At most one merge per sequence: B is fixed for a graph bucket (padded batch), so it pads to B.
        tiles += [(0, 0, 0, 0, -1)] * (capacity - len(tiles))
        merges += [(0, 0, 0, 0)] * (len(q_len) - len(merges))
        num_partials = capacity
    return TilePlan(_int32_table(tiles, 5), _int32_table(merges, 4), group_size, block_m, rows_per_tile,
                    num_partials)


def _tile_height(max_q_len: int, group_size: int) -> tuple[int, int]:
    """(block_m, rows_per_tile). tl.dot wants M >= 16 and a power of two: a decode step (1 row x G heads)
    pads to 16 lanes; prefill tiles take 64 lanes (64 // G rows)."""
    block_m = max(16, _next_power_of_2(max(max_q_len, 1) * group_size))
    block_m = min(block_m, max(64, _next_power_of_2(group_size)))
    return block_m, block_m // group_size


def _kv_piece_lens(q_tiles: list[int], kv_len: list[int], num_kv_heads: int, target_programs: int,
                   min_split_keys: int) -> list[int]:
    """Per sequence: keys per piece of its KV list when it is split, else 0."""
    splittable = [tiles == 1 and n > min_split_keys for tiles, n in zip(q_tiles, kv_len)]
    if not any(splittable) or sum(q_tiles) * num_kv_heads >= target_programs:
        return [0] * len(kv_len)
    # NOTE: pieces sized so the split sequences together give about `target_programs` programs; never
    # below min_split_keys, where the merge would cost more than the parallelism gains; at most
    # MAX_KV_PIECES per sequence (the merge reads them as one block); whole key blocks per piece.
    keys = sum(n for n, ok in zip(kv_len, splittable) if ok)
    piece = max(min_split_keys, -(-keys * num_kv_heads // target_programs))
    lens = []
    for n, ok in zip(kv_len, splittable):
        wanted = min(-(-n // piece), MAX_KV_PIECES)
        length = -(-(-(-n // wanted)) // PIECE_ALIGN) * PIECE_ALIGN
        lens.append(length if ok and n > length else 0)
    return lens


def _host_list(offsets) -> list[int]:
    return offsets.tolist() if isinstance(offsets, torch.Tensor) else [int(x) for x in offsets]


def _int32_table(rows: list[tuple], width: int) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int32).reshape(len(rows), width)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def paged_attention(q, k_cache, v_cache, slot_positions, q_positions, q_start, kv_slots, kv_start, scale,
                    *, max_q_len: int, max_kv_len: int, plan: TilePlan | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v per query row over its own sequence's keys with key_pos <= query_pos.

    q [T, Hq, D]; k_cache, v_cache [S, Hkv, D] (this layer, the step's new K/V already stored); slot_positions
    [S] int; q_positions [T] int; q_start [B+1]; kv_slots [N] int32; kv_start [B+1]; Hq = G * Hkv; D a power
    of two >= 16. Returns out [T, Hq, D] in q's dtype; a row that sees no key gets zeros; rows outside every
    sequence are left unwritten. Pass `plan` (plan_tiles, once per step) to launch without touching the
    host; without it the plan is built here from q_start/kv_start (a host sync, fine for tests).
    max_q_len / max_kv_len describe the step; the plan carries what the launch needs."""
    if triton is None:
        raise RuntimeError("paged_attention needs triton; use paged_attention_reference on this install")
    num_rows, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_q_heads // num_kv_heads
    if plan is None:
        plan = plan_tiles(q_start, kv_start, group_size=group, num_kv_heads=num_kv_heads).to(q.device)
    if plan.group_size != group or group * num_kv_heads != num_q_heads:
        raise ValueError(f"plan cut for {plan.group_size} query heads per KV head, step has {num_q_heads}"
                         f"/{num_kv_heads}")
    if head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(f"head dim {head_dim} must be a power of two >= 16")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last (head) dimension")
    out = torch.empty_like(q)  # [T, Hq, D]
    if plan.num_tiles == 0:
        return out
    kv_slots = kv_slots if kv_slots.numel() else torch.zeros(1, dtype=torch.int32, device=q.device)
    # Workspace of split tiles: normalised partial outputs and their log2-sum-exp, one tile's lanes each.
    partial_out = torch.empty((max(plan.num_partials, 1), num_kv_heads, plan.block_m, head_dim),
                              dtype=torch.float32, device=q.device)
    partial_lse = torch.empty(partial_out.shape[:3], dtype=torch.float32, device=q.device)
    fp32 = q.dtype == torch.float32
    block_n, num_warps = _launch_config(q.dtype, plan.block_m, head_dim)
    attention_kernel, merge_kernel = _kernels()
    attention_kernel[(plan.num_tiles, num_kv_heads)](
        q, k_cache, v_cache, slot_positions, q_positions, kv_slots, plan.tiles, out, partial_out, partial_lse,
        scale * math.log2(math.e),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        out.stride(0), out.stride(1),
        G=group, D=head_dim, BLOCK_M=plan.block_m, BLOCK_N=block_n, FP32_DOT=fp32, num_warps=num_warps,
    )
    if plan.num_merges:
        merge_kernel[(plan.num_merges, num_kv_heads * plan.block_m)](
            partial_out, partial_lse, plan.merges, out, out.stride(0), out.stride(1),
            G=group, D=head_dim, BLOCK_M=plan.block_m, MAX_PIECES=MAX_KV_PIECES, num_warps=4,
        )
    return out


def _launch_config(dtype: torch.dtype, block_m: int, head_dim: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps). NOTE: from ptxas register reports for sm_90 (kernels compiled offline with
    triton 3.6, no GPU; tests/engine/test_paged_attention.py keeps them spill-free): half types with 4 warps
    spill at 64 x 128 tiles (552 B of stack), 8 warps do not; the IEEE fp32 dot runs on FMAs and spills
    4.6-7.8 KB per thread with 64-key blocks, none with 32-key blocks and 8 warps."""
    if dtype == torch.float32:
        return 32, 8
    return 64, 8 if block_m >= 64 or head_dim >= 128 else 4


def _patch_interpreter() -> None:
    """NOTE: two gaps of triton 3.6's CPU interpreter (TRITON_INTERPRET=1), patched here so the tests run
    the very kernel source the GPU compiles; compiled kernels never see this:
    - a loaded scalar is a 1-element array there and becomes a loop bound through int(array), which
      NumPy >= 2.4 refuses (`range(kv_begin, kv_end, ...)` fails);
    - bf16 is held as raw uint16 and tl.dot multiplies those integers: widen bf16 operands to fp32 first
      (exact: bf16 is the top half of an fp32)."""
    import numpy as np
    from triton.runtime import interpreter

    if getattr(interpreter, "longbow_patched", False):
        return
    patch_tensor, builder = interpreter._patch_lang_tensor, interpreter.InterpreterBuilder
    create_dot = builder.create_dot

    def patched_tensor(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    def widen(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        return interpreter.TensorHandle((handle.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def patched_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return create_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    interpreter._patch_lang_tensor, builder.create_dot = patched_tensor, patched_dot
    interpreter.longbow_patched = True


@functools.cache
def _kernels():
    """The two kernels, jitted on first use rather than at import: Triton decides at decoration whether a
    kernel is compiled or interpreted (TRITON_INTERPRET), so a test that sets the flag keeps working even
    when something imported this module earlier."""
    if triton.knobs.runtime.interpret:
        _patch_interpreter()
    return triton.jit(_paged_attention_kernel), triton.jit(_merge_partials_kernel)


def _paged_attention_kernel(
    Q, K, V, SlotPositions, QPositions, KvSlots, Tiles, Out, PartialOut, PartialLse,
    scale_log2,  # softmax scale * log2(e): scores live in the exp2 domain
    stride_q_row, stride_q_head, stride_k_slot, stride_k_head, stride_v_slot, stride_v_head,
    stride_o_row, stride_o_head,
    G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    # One program: one tile (query rows of one sequence x one range of its KV list) and one KV head.
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    num_kv_heads = tl.num_programs(1)
    q_begin = tl.load(Tiles + tile * 5 + 0)
    q_rows = tl.load(Tiles + tile * 5 + 1)
    kv_begin = tl.load(Tiles + tile * 5 + 2)
    kv_end = tl.load(Tiles + tile * 5 + 3)
    partial = tl.load(Tiles + tile * 5 + 4)

    # Lane m of the M dimension is (query row m // G, query head kv_head * G + m % G): the G heads that
    # share this KV head ride in one tl.dot, so each K/V block is read once per group. Lanes past the
    # tile's rows (decode: 1 row x G heads in 16 lanes) are masked off.
    lane = tl.arange(0, BLOCK_M)
    row = (q_begin + lane // G).to(tl.int64)  # [BLOCK_M]
    head = kv_head * G + lane % G  # [BLOCK_M]
    lane_ok = lane // G < q_rows
    dim = tl.arange(0, D)
    q = tl.load(Q + row[:, None] * stride_q_row + head[:, None] * stride_q_head + dim[None, :],
                mask=lane_ok[:, None], other=0.0)  # [BLOCK_M, D]
    q_pos = tl.load(QPositions + row, mask=lane_ok, other=0)  # [BLOCK_M]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max (log2 domain)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for start in range(kv_begin, kv_end, BLOCK_N):
        key = start + tl.arange(0, BLOCK_N)
        key_ok = key < kv_end
        slot = tl.load(KvSlots + key, mask=key_ok, other=0).to(tl.int64)  # [BLOCK_N]
        key_pos = tl.load(SlotPositions + slot, mask=key_ok, other=0)  # [BLOCK_N]
        k_t = tl.load(K + slot[None, :] * stride_k_slot + kv_head * stride_k_head + dim[:, None],
                      mask=key_ok[None, :], other=0.0)  # [D, BLOCK_N]
        if FP32_DOT:  # NOTE: tl.dot defaults to tf32 for fp32 inputs on GPU (~1e-3): ask for IEEE
            s = tl.dot(q, k_t, input_precision="ieee")
        else:
            s = tl.dot(q, k_t)  # [BLOCK_M, BLOCK_N] fp32
        visible = (key_pos[None, :] <= q_pos[:, None]) & key_ok[None, :] & lane_ok[:, None]
        s = tl.where(visible, s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A lane that has seen no visible key yet keeps m = -inf; subtract 0 there instead (no NaN).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])  # [BLOCK_M, BLOCK_N]
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + slot[:, None] * stride_v_slot + kv_head * stride_v_head + dim[None, :],
                    mask=key_ok[:, None], other=0.0)  # [BLOCK_N, D]
        if FP32_DOT:
            pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    seen = l_i > 0.0  # a lane with no visible key outputs zeros, lse -inf
    o = acc / tl.where(seen, l_i, 1.0)[:, None]  # [BLOCK_M, D]
    direct = lane_ok & (partial < 0)
    tl.store(Out + row[:, None] * stride_o_row + head[:, None] * stride_o_head + dim[None, :],
             o.to(Out.dtype.element_ty), mask=direct[:, None])
    # A split tile writes its lanes to its workspace entry, where the merge finds them.
    entry = ((tl.maximum(partial, 0) * num_kv_heads + kv_head) * BLOCK_M + lane).to(tl.int64)
    is_partial = lane_ok & (partial >= 0)  # [BLOCK_M]
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    tl.store(PartialLse + entry, lse, mask=is_partial)
    tl.store(PartialOut + entry[:, None] * D + dim[None, :], o, mask=is_partial[:, None])

def _merge_partials_kernel(
    PartialOut, PartialLse, Merges, Out, stride_o_row, stride_o_head,
    G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, MAX_PIECES: tl.constexpr,
):
    # One program: one lane (query row x query head) of one split sequence, all its pieces at once:
    # out = sum_i w_i out_i / sum_i w_i with w_i = exp2(lse_i - max lse). A program per lane and no loop
    # over pieces: a serial walk over 64 pieces would cost more than the split saved.
    job = tl.program_id(0)
    kv_head = tl.program_id(1) // BLOCK_M
    lane = tl.program_id(1) % BLOCK_M
    num_kv_heads = tl.num_programs(1) // BLOCK_M
    q_begin = tl.load(Merges + job * 4 + 0)
    q_rows = tl.load(Merges + job * 4 + 1)
    first = tl.load(Merges + job * 4 + 2)
    count = tl.load(Merges + job * 4 + 3)
    piece = tl.arange(0, MAX_PIECES)
    ok = (piece < count) & (lane // G < q_rows)  # [MAX_PIECES]; an idle lane loads nothing
    entry = (((first + piece) * num_kv_heads + kv_head) * BLOCK_M + lane).to(tl.int64)  # [MAX_PIECES]
    lse = tl.load(PartialLse + entry, mask=ok, other=float("-inf"))  # [MAX_PIECES]
    dim = tl.arange(0, D)
    o = tl.load(PartialOut + entry[:, None] * D + dim[None, :], mask=ok[:, None], other=0.0)  # [PIECES, D]
    top = tl.max(lse, 0)
    w = tl.exp2(lse - tl.where(top == float("-inf"), 0.0, top))  # [MAX_PIECES]; 0 for empty pieces
    total = tl.sum(w, 0)
    merged = tl.sum(o * w[:, None], 0) / tl.where(total > 0.0, total, 1.0)  # [D]
    row = (q_begin + lane // G).to(tl.int64)
    head = kv_head * G + lane % G
    lane_ok = (dim >= 0) & (lane // G < q_rows)  # [D]
    tl.store(Out + row * stride_o_row + head * stride_o_head + dim, merged.to(Out.dtype.element_ty),
             mask=lane_ok)


def paged_attention_reference(q, k_cache, v_cache, slot_positions, q_positions, q_start, kv_slots, kv_start,
                              scale, *, max_q_len: int = 0, max_kv_len: int = 0,
                              plan: TilePlan | None = None) -> torch.Tensor:
    """The same contract as paged_attention, per sequence in fp32 torch: gather the sequence's slots, mask
    by position ids, softmax. Rows that see no key get zeros (as the kernel). `plan` is ignored."""
    num_q_heads, num_kv_heads = q.shape[1], k_cache.shape[1]
    group = num_q_heads // num_kv_heads
    out = torch.zeros_like(q)  # [T, Hq, D]
    q_bounds, kv_bounds = q_start.tolist(), kv_start.tolist()
    for b in range(len(q_bounds) - 1):
        rows = slice(q_bounds[b], q_bounds[b + 1])
        slots = kv_slots[kv_bounds[b]:kv_bounds[b + 1]].long()  # [Tk]
        if rows.stop == rows.start or slots.numel() == 0:
            continue
        keys = k_cache[slots].float().repeat_interleave(group, dim=1)  # [Tk, Hq, D]
        values = v_cache[slots].float().repeat_interleave(group, dim=1)  # [Tk, Hq, D]
        scores = torch.einsum("qhd,khd->hqk", q[rows].float(), keys) * scale  # [Hq, Tq, Tk]
        visible = slot_positions[slots].unsqueeze(0) <= q_positions[rows].unsqueeze(1)  # [Tq, Tk]
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1).nan_to_num(0.0)
        out[rows] = torch.einsum("hqk,khd->qhd", probs, values).to(q.dtype)
    return out
