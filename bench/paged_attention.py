"""Micro-benchmark: the step-wide paged attention kernel (services/engine/paged_attention.py) against dense
SDPA on the same KV pre-gathered into contiguous tensors (the lower bound: what attention costs when the
cache layout is ideal and nothing is masked).

Workload: decode steps (one query row per sequence), batch 1 / 8 / 64 x context 640 and 32,768 keys,
SmolLM2-135M attention shape (9 query heads, 3 KV heads, head dim 64), bf16. The cache is paged like the
engine's: blocks of 16 slots, each sequence's blocks drawn at random from the pool (so its KV is scattered),
position ids stored per slot. Per configuration:
- gpu_us: device time of one call, from CUDA events, with L2 flushed before each call (the KV of a 640-key
  batch would otherwise sit in the 50 MB L2). Paged is timed with the split-KV plan and without
  (`split=False`: one program per sequence and KV head).
- wall_us: back-to-back calls timed on the host, launch overhead included (the plan built beforehand, as
  the engine builds it once per step for all layers); graph_us: the same call replayed from a CUDA graph.
- plan_us: host time of plan_tiles for the step (paid once per step, not per layer).
- kv_GBps: KV bytes read / paged gpu time; max_err: paged vs SDPA, max abs difference.

It runs on a bare GPU image (torch + triton, this repository NOT installed): the kernel file is loaded by
path and only torch, triton and the standard library are imported.

    python bench/paged_attention.py                  # CUDA: table, then results/paged_attention.json
    python bench/paged_attention.py --device cpu     # smoke: reference + Triton interpreter on tiny sizes
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
KERNEL_FILE = HERE.parent / "services" / "engine" / "paged_attention.py"
RESULTS = HERE / "results" / "paged_attention.json"
SHAPE = dict(q_heads=9, kv_heads=3, head_dim=64)  # SmolLM2-135M
BLOCK_SIZE = 16


def load_kernel_module():
    """The kernel file by path (this repository need not be installed). Registered in sys.modules before
    it runs: its dataclass looks itself up there."""
    spec = importlib.util.spec_from_file_location("longbow_paged_attention", KERNEL_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def make_decode_step(torch, batch: int, context: int, device: str, dtype, seed: int = 0):
    """A decode step over a paged pool: each sequence's `context` keys in random blocks, listed in position
    order (block by block), its one query row at the last position."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = -(-context // BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq + 8
    blocks = torch.randperm(num_blocks, generator=gen)[:batch * blocks_per_seq].view(batch, blocks_per_seq)
    offsets = torch.arange(BLOCK_SIZE)
    slots = (blocks[:, :, None] * BLOCK_SIZE + offsets).reshape(batch, -1)[:, :context]  # [B, context]
    slot_positions = torch.full((num_blocks * BLOCK_SIZE,), -1, dtype=torch.int64)
    slot_positions[slots.reshape(-1)] = torch.arange(context).repeat(batch)
    h_q, h_kv, d = SHAPE["q_heads"], SHAPE["kv_heads"], SHAPE["head_dim"]
    on = dict(device=device)
    k_cache = torch.randn(num_blocks * BLOCK_SIZE, h_kv, d, dtype=dtype, **on)  # [S, Hkv, D]
    v_cache = torch.randn(num_blocks * BLOCK_SIZE, h_kv, d, dtype=dtype, **on)
    q = torch.randn(batch, h_q, d, dtype=dtype, **on)  # [T=B, Hq, D]
    q_start = torch.arange(batch + 1)
    kv_start = torch.arange(batch + 1) * context
    args = (q, k_cache, v_cache, slot_positions.to(**on), torch.full((batch,), context - 1, **on), q_start,
            slots.reshape(-1).to(torch.int32).to(**on), kv_start, d ** -0.5)
    return args, slots


def dense_sdpa_inputs(torch, args, slots):
    """The same KV gathered once into contiguous [B, Hkv, context, D] (not timed)."""
    q, k_cache, v_cache = args[:3]
    keys = k_cache[slots.to(q.device)].permute(0, 2, 1, 3).contiguous()
    values = v_cache[slots.to(q.device)].permute(0, 2, 1, 3).contiguous()
    return q[:, :, None, :], keys, values  # q [B, Hq, 1, D]


def gpu_time_us(torch, fn, iters: int) -> float:
    """Median device time of fn from CUDA events, L2 flushed before each call (the flush also hides the
    launch, so this is kernel time)."""
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def wall_time_us(torch, fn, iters: int) -> float:
    """Host time per call of back-to-back calls, launches included."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters * 1e6


def graph_time_us(torch, fn, iters: int) -> float:
    """Per-call time of fn replayed from a CUDA graph (how the engine's decode steps will run)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm up (compiles) outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return wall_time_us(torch, graph.replay, iters)


def measure(torch, kernel, batch: int, context: int, device: str, dtype, iters: int) -> dict:
    args, slots = make_decode_step(torch, batch, context, device, dtype)
    q, k_cache = args[0], args[1]
    h_kv = k_cache.shape[1]
    group = q.shape[1] // h_kv
    start = time.perf_counter()
    plan = kernel.plan_tiles(args[5], args[7], group_size=group, num_kv_heads=h_kv)
    plan_us = (time.perf_counter() - start) * 1e6
    plans = {"split": plan.to(device), "unsplit": kernel.plan_tiles(
        args[5], args[7], group_size=group, num_kv_heads=h_kv, split=False).to(device)}
    sizes = dict(max_q_len=1, max_kv_len=context)
    row = dict(batch=batch, context=context, tiles=plan.num_tiles, merges=plan.num_merges,
               plan_us=round(plan_us, 1))
    if device == "cpu":  # smoke: the interpreter against the reference, no timing worth reporting
        reference = kernel.paged_attention_reference(*args, **sizes)
        for name, p in plans.items():
            out = kernel.paged_attention(*args, **sizes, plan=p)
            row[f"max_err_{name}"] = float((out.float() - reference.float()).abs().max())
        return row

    import torch.nn.functional as F

    dense_q, keys, values = dense_sdpa_inputs(torch, args, slots)
    sdpa = lambda: F.scaled_dot_product_attention(dense_q, keys, values, enable_gqa=True)  # noqa: E731
    calls = {name: (lambda p=p: kernel.paged_attention(*args, **sizes, plan=p)) for name, p in plans.items()}
    calls["sdpa"] = sdpa
    expected = sdpa()[:, :, 0, :].float()  # [B, Hq, D]
    for name, fn in calls.items():
        timers = (("gpu_us", gpu_time_us), ("wall_us", wall_time_us), ("graph_us", graph_time_us))
        for column, timer in timers:
            try:
                row[f"{name}_{column}"] = round(timer(torch, fn, iters), 1)
            except Exception as error:  # one failing column must not hide the others
                row[f"{name}_{column}"] = None
                row.setdefault("errors", []).append(f"{name} {column}: {type(error).__name__}: {error}")
        if name != "sdpa":
            row[f"max_err_{name}"] = float((fn().float() - expected).abs().max())
    kv_bytes = 2 * batch * context * h_kv * q.shape[2] * q.element_size()
    if row.get("split_gpu_us"):
        row["kv_GBps"] = round(kv_bytes / (row["split_gpu_us"] * 1e-6) / 1e9)
    return row


COLUMNS = ["batch", "context", "tiles", "merges", "split_gpu_us", "unsplit_gpu_us", "sdpa_gpu_us",
           "split_wall_us", "sdpa_wall_us", "split_graph_us", "sdpa_graph_us", "plan_us", "kv_GBps",
           "max_err_split", "max_err_unsplit"]


def print_table(rows: list[dict]) -> None:
    columns = [c for c in COLUMNS if any(c in r for r in rows)]
    print(" | ".join(columns))
    for r in rows:
        cells = []
        for c in columns:
            value = r.get(c, "")
            is_error = c.startswith("max_err") and isinstance(value, float)
            cells.append(f"{value:.2g}" if is_error else str(value))
        print(" | ".join(cells))
    for r in rows:
        for error in r.get("errors", []):
            print(f"error (batch {r['batch']}, context {r['context']}): {error}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--batches", type=int, nargs="+")
    parser.add_argument("--contexts", type=int, nargs="+")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--out", type=Path, help=f"JSON results (default on CUDA: {RESULTS}; CPU: none)")
    options = parser.parse_args()
    if options.device == "cpu":
        # Before triton is imported: the kernels then run in Triton's CPU interpreter.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    import triton

    kernel = load_kernel_module()
    cpu = options.device == "cpu"
    batches = options.batches or ([1, 2] if cpu else [1, 8, 64])
    contexts = options.contexts or ([40, 300] if cpu else [640, 32768])
    dtype = torch.bfloat16
    rows = []
    for context in contexts:
        for batch in batches:
            rows.append(measure(torch, kernel, batch, context, options.device, dtype, options.iters))
            print(f"done batch {batch} context {context}", file=sys.stderr)
    print_table(rows)
    device_name = torch.cuda.get_device_name() if not cpu else platform.processor() or "cpu"
    record = dict(command=" ".join(["python"] + sys.argv), device=device_name, torch=torch.__version__,
                  triton=triton.__version__, dtype=str(dtype), shape=SHAPE, block_size=BLOCK_SIZE,
                  smoke=cpu, rows=rows)
    out = options.out or (None if cpu else RESULTS)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
