"""The step-wide paged attention kernel against the per-sequence reference and an independent dense SDPA.

NOTE: without CUDA the Triton kernel runs under Triton's CPU interpreter. Triton reads TRITON_INTERPRET
when a function is decorated: its own library functions at `import triton`, ours on first use. So this
module sets the flag before importing triton (setdefault: an explicit TRITON_INTERPRET wins), and fails
loudly if an earlier test module imported triton without it. On a CUDA machine the same tests run the
compiled kernel on the GPU. The interpreter is slow: sizes stay small (a few hundred keys).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

triton = pytest.importorskip("triton")
if not torch.cuda.is_available() and type(triton.language.standard.max).__name__ != "InterpretedFunction":
    # triton's own library kernels are built at its import: it was imported before the flag was set.
    raise RuntimeError("triton was imported before TRITON_INTERPRET=1 was set: set it in the environment "
                       "(or in tests/conftest.py) so the interpreter can run the kernels")

from longbow.services.engine.paged_attention import (  # noqa: E402
    paged_attention,
    paged_attention_reference,
    plan_tiles,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (atol, rtol). NOTE: half outputs also get rtol 1e-2: a bf16 output of magnitude 2..4 has a 0.0156 ulp,
# so two correct roundings of the same value can differ by more than an absolute 1e-2.
TOLERANCE = {torch.float32: (1e-5, 0.0), torch.bfloat16: (1e-2, 1e-2), torch.float16: (1e-2, 1e-2)}


@dataclass
class Seq:
    """One sequence of a step: the positions of the keys it may see and of its query rows."""

    key_positions: list[int]
    query_positions: list[int]


def decode(context: int) -> Seq:
    return Seq(list(range(context)), [context - 1])


def chunk(done: int, rows: int) -> Seq:
    """A prefill chunk: `rows` new tokens after `done` cached ones; keys include the chunk itself."""
    return Seq(list(range(done + rows)), list(range(done, done + rows)))


@dataclass
class Step:
    args: tuple  # paged_attention's positional arguments
    max_q_len: int
    max_kv_len: int

    @property
    def q(self) -> torch.Tensor:
        return self.args[0]


def make_step(seqs: list[Seq], *, group: int = 3, kv_heads: int = 2, head_dim: int = 64,
              dtype=torch.float32, shuffle: bool = True, seed: int = 0) -> Step:
    """Keys of all sequences at random slots of one pool (plus unused slots), each sequence's slot list in
    shuffled order when `shuffle` (as after PIE edits), else in position order."""
    gen = torch.Generator().manual_seed(seed)
    total_keys = sum(len(s.key_positions) for s in seqs)
    num_slots = total_keys + 17
    free = torch.randperm(num_slots, generator=gen)
    slot_positions = torch.full((num_slots,), -1, dtype=torch.int64)
    kv_slots, q_positions, used = [], [], 0
    for s in seqs:
        slots = free[used:used + len(s.key_positions)]
        used += len(s.key_positions)
        slot_positions[slots] = torch.tensor(s.key_positions, dtype=torch.int64)
        order = torch.randperm(len(slots), generator=gen) if shuffle else torch.arange(len(slots))
        kv_slots.append(slots[order])
        q_positions.append(torch.tensor(s.query_positions, dtype=torch.int64))
    q_lens = [len(s.query_positions) for s in seqs]
    kv_lens = [len(s.key_positions) for s in seqs]
    q_start = torch.tensor([0] + q_lens).cumsum(0)
    kv_start = torch.tensor([0] + kv_lens).cumsum(0)
    rows = int(q_start[-1])
    q = torch.randn(rows, group * kv_heads, head_dim, generator=gen)
    k_cache = torch.randn(num_slots, kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(num_slots, kv_heads, head_dim, generator=gen)
    on = dict(device=DEVICE)
    q_positions = torch.cat(q_positions) if seqs else torch.zeros(0, dtype=torch.int64)
    kv_slots = torch.cat(kv_slots) if seqs else torch.zeros(0, dtype=torch.int64)
    args = (q.to(dtype=dtype, **on), k_cache.to(dtype=dtype, **on), v_cache.to(dtype=dtype, **on),
            slot_positions.to(**on), q_positions.to(**on), q_start, kv_slots.to(torch.int32).to(**on),
            kv_start, head_dim ** -0.5)
    return Step(args, max(q_lens, default=0), max(kv_lens, default=0))


def run_kernel(step: Step, **plan_options) -> torch.Tensor:
    q, k_cache, *_ = step.args
    plan = plan_tiles(step.args[5], step.args[7], group_size=q.shape[1] // k_cache.shape[1],
                      num_kv_heads=k_cache.shape[1], **plan_options).to(DEVICE)
    return paged_attention(*step.args, max_q_len=step.max_q_len, max_kv_len=step.max_kv_len, plan=plan)


def run_reference(step: Step) -> torch.Tensor:
    return paged_attention_reference(*step.args, max_q_len=step.max_q_len, max_kv_len=step.max_kv_len)


def dense_sdpa(step: Step, visible_fn=None) -> torch.Tensor:
    """Independent check: per sequence, gather its KV contiguously and call torch's SDPA in fp32.
    `visible_fn(key_positions [Tk], query_positions [Tq]) -> [Tq, Tk]` overrides the causal rule."""
    q, k_cache, v_cache, slot_positions, q_positions, q_start, kv_slots, kv_start, scale = step.args
    visible_fn = visible_fn or (lambda key_pos, q_pos: key_pos[None, :] <= q_pos[:, None])
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for b in range(len(q_start) - 1):
        rows = slice(int(q_start[b]), int(q_start[b + 1]))
        slots = kv_slots[int(kv_start[b]):int(kv_start[b + 1])].long()
        visible = visible_fn(slot_positions[slots], q_positions[rows])  # [Tq, Tk]
        out[rows] = F.scaled_dot_product_attention(
            q[rows].float().transpose(0, 1), k_cache[slots].float().transpose(0, 1),
            v_cache[slots].float().transpose(0, 1), attn_mask=visible, scale=scale, enable_gqa=True,
        ).transpose(0, 1)
    return out


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, dtype) -> None:
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


MIXED = [decode(1), decode(40), chunk(0, 23), decode(150), chunk(60, 37), decode(7), chunk(33, 70),
         chunk(5, 2)]


@pytest.mark.parametrize("dtype,group,head_dim", [
    (torch.float32, 1, 64), (torch.float32, 3, 128), (torch.float32, 4, 64),
    (torch.bfloat16, 3, 64), (torch.bfloat16, 4, 128), (torch.float16, 1, 128), (torch.float16, 3, 64),
])
def test_mixed_step_equals_reference_and_sdpa(dtype, group, head_dim):
    """Decodes and prefill chunks of uneven lengths in one call, slots shuffled: prefill rows see keys of
    later positions in their list and must skip them by position id."""
    step = make_step(MIXED, group=group, head_dim=head_dim, dtype=dtype)
    out = run_kernel(step)
    assert out.dtype == dtype and out.shape == step.q.shape
    assert_matches(out, run_reference(step), dtype)
    assert_matches(out, dense_sdpa(step), dtype)


def test_positions_after_edits_not_storage_order():
    """PIE-like: positions with a gap and out of storage order; a query at a cursor inside a document
    lists keys on both sides of it and sees only those at or before its position."""
    document = list(range(0, 10)) + list(range(25, 60))  # 15 tokens deleted at 10..24
    seqs = [Seq(document, [30]), Seq(document, [25, 26, 27, 59]), Seq(list(range(70))[::-1], [3, 69])]
    step = make_step(seqs, group=3, shuffle=True, seed=1)
    out = run_kernel(step)
    assert_matches(out, run_reference(step), torch.float32)
    assert_matches(out, dense_sdpa(step), torch.float32)


def test_wrong_mask_fails_the_comparison():
    """Negative control: a mask by storage order (list index) instead of position id, or no mask at all,
    must not pass the same comparison, so the checks above can tell."""
    step = make_step([chunk(20, 30), Seq(list(range(50)), [10])], group=3, seed=2)
    out = run_kernel(step)

    def by_list_order(key_pos, q_pos):  # the i-th listed key "is at" position i
        return torch.arange(len(key_pos), device=key_pos.device)[None, :] <= q_pos[:, None]

    def everything(key_pos, q_pos):
        return torch.ones(len(q_pos), len(key_pos), dtype=torch.bool, device=q_pos.device)

    for wrong in (by_list_order, everything):
        with pytest.raises(AssertionError):
            assert_matches(out, dense_sdpa(step, wrong), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_kv_equals_unsplit(dtype):
    """Sequences whose lists are longer than one piece go through the split + merge path; the result
    equals the unsplit kernel and the reference. The in-order chunk makes whole pieces invisible to its
    early rows (a piece with no visible key must not disturb the merge)."""
    seqs = [decode(700), decode(300), decode(20), chunk(390, 10)]
    step = make_step(seqs, group=3, dtype=dtype, seed=3)
    step_in_order = make_step([chunk(0, 12), Seq(list(range(500)), [0, 130, 499])], group=3, dtype=dtype,
                              shuffle=False, seed=4)
    for s in (step, step_in_order):
        plan = plan_tiles(s.args[5], s.args[7], group_size=3, num_kv_heads=2, min_split_keys=128)
        assert plan.num_merges >= 1 and plan.num_partials > plan.num_merges
        split = run_kernel(s, min_split_keys=128)
        unsplit = run_kernel(s, split=False)
        assert_matches(split, unsplit, dtype)
        assert_matches(split, run_reference(s), dtype)
        assert_matches(split, dense_sdpa(s), dtype)


def test_padded_plan_for_graph_replay_gives_the_same_output():
    step = make_step([decode(300), decode(9), chunk(3, 4)], group=3, seed=5)
    padded = run_kernel(step, min_split_keys=128, capacity=16)
    assert_matches(padded, run_kernel(step, min_split_keys=128), torch.float32)
    assert_matches(padded, run_reference(step), torch.float32)


def test_decode_row_seeing_one_key_returns_its_value():
    step = make_step([decode(1), decode(1)], group=4, head_dim=128, seed=6)
    q, k_cache, v_cache, *_, kv_slots, _, _ = step.args
    out = run_kernel(step)
    expected = v_cache[kv_slots.long()].repeat_interleave(4, dim=1)  # [2, Hq, D]
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_zero_length_edges():
    """A sequence with keys but no query rows, rows with no keys, a row whose position precedes all its
    keys (nothing visible: zeros), an empty sequence, and a step with no sequences at all."""
    seqs = [Seq(list(range(30)), []), Seq([], [4, 5]), decode(12), Seq(list(range(10, 20)), [3, 15]),
            Seq([], [])]
    step = make_step(seqs, group=3, seed=7)
    out = run_kernel(step)
    reference = run_reference(step)
    assert_matches(out, reference, torch.float32)
    assert out[0:2].abs().max() == 0 and out[3].abs().max() == 0 and out[4].abs().max() > 0

    empty = make_step([], group=3)
    assert run_kernel(empty).shape == (0, 6, 64)
    only_keys = make_step([Seq(list(range(8)), [])], group=3)
    assert run_kernel(only_keys).shape == (0, 6, 64)


def test_plan_covers_every_row_and_key_once():
    """Host-side planner: the tiles of each sequence cover its rows x its KV list exactly once, split
    pieces are merged in order, padding adds only empty tiles, and a step with enough programs is not
    split at all."""
    gen = torch.Generator().manual_seed(8)
    q_lens = torch.randint(0, 40, (25,), generator=gen)
    q_lens[::3] = 1
    kv_lens = q_lens + torch.randint(0, 900, (25,), generator=gen)
    q_start = torch.cat([torch.zeros(1, dtype=torch.long), q_lens.cumsum(0)])
    kv_start = torch.cat([torch.zeros(1, dtype=torch.long), kv_lens.cumsum(0)])
    plan = plan_tiles(q_start, kv_start, group_size=3, num_kv_heads=3, min_split_keys=128, capacity=200)
    covered = torch.zeros(int(q_start[-1]), int(kv_start[-1]), dtype=torch.int32)
    for q_begin, q_rows, kv_begin, kv_end, partial in plan.tiles.tolist():
        covered[q_begin:q_begin + q_rows, kv_begin:kv_end] += 1
        assert q_rows <= plan.rows_per_tile
    for b in range(25):
        block = covered[q_start[b]:q_start[b + 1], kv_start[b]:kv_start[b + 1]]
        assert bool((block == 1).all()), b
    assert int(covered.sum()) == int((q_lens * kv_lens).sum())
    real_merges = [m for m in plan.merges.tolist() if m[3] > 0]
    assert real_merges and sum(m[3] for m in real_merges) == int((plan.tiles[:, 4] >= 0).sum())

    many_decodes = torch.arange(0, 201)  # 200 decodes x 3 KV heads: the GPU is full without splitting
    crowded = plan_tiles(many_decodes, many_decodes * 5000, group_size=3, num_kv_heads=3)
    assert crowded.num_merges == 0 and crowded.block_m == 16


# ---------------------------------------------------------------- the H200 build, checked without a GPU

class _RecordLaunches:
    """Stands in for a jitted kernel: records `kernel[grid](*args, **kwargs)` instead of running it, as the
    name -> type signature and constants triton.compile takes."""

    TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
             torch.int64: "i64"}

    def __init__(self, fn):
        import inspect

        self.name, self.arg_names, self.launches = fn.__name__, list(inspect.signature(fn).parameters), []

    def __getitem__(self, grid):
        return self.record

    def record(self, *args, **kwargs):
        signature = {name: "*" + self.TYPES[v.dtype] if isinstance(v, torch.Tensor) else
                     "fp32" if isinstance(v, float) else "i32" for name, v in zip(self.arg_names, args)}
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        signature.update({name: "constexpr" for name in kwargs})
        self.launches.append(dict(kernel=self.name, signature=signature, constants=kwargs, options=options))


# Runs in a fresh process: triton's code generator misbehaves once TRITON_INTERPRET has been on in a process
# (its own standard-library kernels were built as interpreted functions at import).
_COMPILE_SCRIPT = """
import json, subprocess, sys, tempfile
from pathlib import Path
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction
from longbow.services.engine import paged_attention as module

cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
for launch in json.loads(sys.argv[1]):
    fn = JITFunction(getattr(module, launch["kernel"]))
    source = ASTSource(fn, launch["signature"], constexprs=launch["constants"])
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=launch["options"])
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        report = subprocess.run([cuobjdump, "--dump-resource-usage", cubin.name], capture_output=True,
                                text=True, check=True).stdout
    print(launch["kernel"], next(line for line in report.splitlines() if "REG:" in line).strip())
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other tests compile and run the kernels")
def test_kernels_compile_for_h200_without_spills(monkeypatch):
    """The exact launches paged_attention makes, compiled for sm_90 (H200) by triton's own toolchain on this
    CPU (ptxas ships in the wheel), as the GPU would at the first call: catches what the interpreter cannot
    (typing of loop-carried values, tl.dot shapes and precisions) and register spills (stack bytes)."""
    import json
    import subprocess
    import sys

    from longbow.services.engine import paged_attention as module

    recorders = (_RecordLaunches(module._paged_attention_kernel),
                 _RecordLaunches(module._merge_partials_kernel))
    monkeypatch.setattr(module, "_kernels", lambda: recorders)
    for dtype, group, head_dim, seqs in [
        (torch.bfloat16, 3, 64, [decode(700), decode(40)]),  # the SmolLM2 decode step, split
        (torch.float16, 4, 128, [chunk(10, 40), decode(700)]),  # 64-lane prefill tiles, 8 warps
        (torch.float32, 3, 128, [chunk(0, 30), decode(500)]),  # the IEEE fp32 path
    ]:
        run_kernel(make_step(seqs, group=group, head_dim=head_dim, dtype=dtype), min_split_keys=128)
    launches = recorders[0].launches + recorders[1].launches
    assert len(launches) == 6
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, json.dumps(launches)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = result.stdout.strip().splitlines()
    assert len(reports) == 6
    for report in reports:
        assert "STACK:0 " in report, report
