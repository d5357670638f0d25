"""Benchmark: TokenRing vs ring vs Ulysses vs one process, measured on CPU with gloo, next to the cost
model's predictions; then the cost model's projections for GPU settings.

For each N (one spawn of N processes per N) the ranks first calibrate the cost model on this machine
while running together (attention FLOP rate per rank, loopback bandwidth and latency), then time one
forward per schedule, length and shape, with a warm-up call before. Per forward it reports:
- time: slowest rank, barrier to barrier;
- bytes sent per rank (CommCounter) and the cost model's prediction;
- exposed communication: time ranks spent blocked in wait();
- comm alone: the same messages replayed with no compute; hidden = 1 - exposed / comm alone.

    python bench/ringattn.py                      # full default run (~10 min on 2 cores)
    python bench/ringattn.py --lengths 2048 --world-sizes 2   # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from longbow.ringattn import SCHEDULES, CommCounter
from longbow.ringattn import costmodel as cm
from longbow.ringattn.comm import DistTransport
from longbow.ringattn.layout import layout_indices
from longbow.ringattn.local import block_attention, computed_pairs

SHAPES = {"mha": (8, 8, 64), "smollm2": (9, 3, 64)}  # (query heads, KV heads, head dim)
PREFILL = ("tokenring", "ring", "ulysses")
RESULTS = Path(__file__).resolve().parent / "results" / "ringattn.json"


def _inputs(length: int, shape: str, seed: int = 0) -> tuple[torch.Tensor, ...]:
    h_q, h_kv, d = SHAPES[shape]
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(length, h_q, d, generator=gen), torch.randn(length, h_kv, d, generator=gen),
            torch.randn(length, h_kv, d, generator=gen))


# ---------------------------------------------------------------- calibration (inside the ranks)

def _calibrate_flops(shape: str) -> float:
    """Attention FLOP rate of this rank while every rank computes: a causal 2048-token diagonal
    block, so masked, unmasked and skipped tiles weigh in as they do in the schedules."""
    q, k, v = _inputs(2048, shape)
    pos = torch.arange(2048)
    block_attention(q[:256], k, v, pos[:256], pos)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(2):
        block_attention(q, k, v, pos, pos, causal=True)
    elapsed = (time.perf_counter() - start) / 2
    return 4.0 * q.shape[1] * q.shape[2] * computed_pairs(pos, pos, True, q.shape[1]) / elapsed


def _ring_exchange_s(transport: DistTransport, nbytes: int, reps: int) -> float:
    n, r = transport.world_size, transport.rank
    send, recv = torch.zeros(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(reps):
        transport.wait(transport.exchange("calibrate", [((r + 1) % n, send)], [((r - 1) % n, recv)]))
    return (time.perf_counter() - start) / reps


def _calibrate_link(transport: DistTransport) -> tuple[float, float]:
    """(bytes/s per direction, latency s) of a ring exchange with every rank sending at once."""
    if transport.world_size == 1:
        return 1e12, 0.0
    latency = _ring_exchange_s(transport, 8, 50)
    big = 8 << 20
    _ring_exchange_s(transport, big, 1)
    return big / max(_ring_exchange_s(transport, big, 4) - latency, 1e-9), latency


def _max_over_ranks(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


# ---------------------------------------------------------------- measurement (inside the ranks)

def _replay(transport: DistTransport, counter: CommCounter) -> float:
    """Seconds to send the messages `counter` logged, step by step, with no compute in between."""
    dist.barrier()
    start = time.perf_counter()
    steps: dict[str, list] = {}
    for message in counter.messages:
        steps.setdefault(message.step, []).append(message)
    n = transport.world_size
    for messages in steps.values():
        sends = [(m.peer, torch.empty(m.sent, dtype=torch.uint8)) for m in messages if m.kind == "p2p" and m.sent]
        recvs = [(m.peer, torch.empty(m.received, dtype=torch.uint8)) for m in messages if m.kind == "p2p" and m.received]
        if sends or recvs:
            transport.wait(transport.exchange("replay", sends, recvs))
        for m in messages:
            if m.kind == "all_gather":
                transport.all_gather("replay", torch.empty(m.sent // (n - 1), dtype=torch.uint8))
            elif m.kind == "all_to_all":
                transport.all_to_all("replay", [torch.empty(m.sent // (n - 1), dtype=torch.uint8)] * n)
    return time.perf_counter() - start


def _shard_args(length: int, shape: str, rank: int, n: int) -> tuple[torch.Tensor, ...]:
    q, k, v = _inputs(length, shape)
    index = layout_indices(length, n, "zigzag")[rank]
    return q[index], k[index], v[index], index, index


def _run_schedule(schedule: str, length: int, shape: str, rank: int, n: int) -> dict:
    fn = SCHEDULES[schedule][0]
    # NOTE: warm up on a short sequence (gloo connections, deepspeed init); a full-length warm-up
    # would double the run time of a CPU benchmark whose largest forwards take tens of seconds.
    fn(*_shard_args(64 * n, shape, rank, n), causal=True)
    args = _shard_args(length, shape, rank, n)
    counter = CommCounter()
    dist.barrier()
    start = time.perf_counter()
    fn(*args, causal=True, counter=counter)
    elapsed = time.perf_counter() - start
    exposed = sum(counter.wait_s.values())
    if schedule == "ulysses":  # blocking all-to-alls: nothing is hidden; wait() is never called
        exposed = None
    comm_alone = _replay(DistTransport(), CommCounter()) if n == 1 else _replay(DistTransport(), counter)
    sent, _ = counter.total()
    return {"time_s": _max_over_ranks(elapsed), "exposed_s": None if exposed is None else _max_over_ranks(exposed),
            "comm_alone_s": _max_over_ranks(comm_alone), "sent_bytes": int(_max_over_ranks(sent))}


def _rank_main(rank: int, n: int, port: int, configs: list[tuple[int, str]], out_queue) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=n,
                            timeout=timedelta(seconds=300))
    transport = DistTransport()
    bandwidth, latency = _calibrate_link(transport)
    flops = {shape: _calibrate_flops(shape) for shape in SHAPES}
    flops = {shape: -_max_over_ranks(-rate) for shape, rate in flops.items()}  # slowest rank
    bandwidth, latency = -_max_over_ranks(-bandwidth), _max_over_ranks(latency)
    if rank == 0:
        out_queue.put(("calibration", n, {"flops_per_s": flops, "link_bytes_per_s": bandwidth, "latency_s": latency}))
    for length, shape in configs:
        for schedule in PREFILL:
            if not cm.applicable(schedule, cm.AttentionShape(*SHAPES[shape]), n):
                continue
            result = _run_schedule(schedule, length, shape, rank, n)
            if rank == 0:
                out_queue.put(("result", n, {"schedule": schedule, "length": length, "shape": shape, **result}))
    dist.destroy_process_group()
    if rank == 0:
        out_queue.put(("done", n, None))


# ---------------------------------------------------------------- driver

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _single_process(length: int, shape: str) -> float:
    torch.set_num_threads(1)
    q, k, v = _inputs(length, shape)
    pos = torch.arange(length)
    block_attention(q[:256], k, v, pos[:256], pos)  # warm-up
    start = time.perf_counter()
    block_attention(q, k, v, pos, pos, causal=True)
    return time.perf_counter() - start


def _predict(schedule: str, length: int, shape: str, n: int, calibration: dict) -> cm.Prediction:
    attention = cm.AttentionShape(*SHAPES[shape], dtype_bytes=4, causal=True)
    hw = cm.Hardware("cpu-gloo", calibration["flops_per_s"][shape], calibration["link_bytes_per_s"],
                     calibration["latency_s"], "switch")
    pos = cm.prefill_positions(length, n)
    return cm.predict(schedule, cm.schedule_steps(schedule, attention, pos, pos), attention, hw)


def run_world(n: int, configs: list[tuple[int, str]], timeout_s: float) -> tuple[dict, list[dict]]:
    context = mp.get_context("spawn")
    out_queue = context.Queue()
    port = _free_port()
    procs = [context.Process(target=_rank_main, args=(r, n, port, configs, out_queue)) for r in range(n)]
    for proc in procs:
        proc.start()
    calibration, rows = {}, []
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            kind, _, payload = out_queue.get(timeout=max(1.0, deadline - time.monotonic()))
            if kind == "done":
                break
            if kind == "calibration":
                calibration = payload
                print(f"  N={n} calibration: {payload['link_bytes_per_s'] / 1e9:.2f} GB/s, "
                      f"{payload['latency_s'] * 1e6:.0f} us, "
                      + ", ".join(f"{s} {r / 1e9:.1f} GFLOP/s" for s, r in payload["flops_per_s"].items()), flush=True)
                continue
            prediction = _predict(payload["schedule"], payload["length"], payload["shape"], n, calibration)
            payload.update(world_size=n, predicted_s=prediction.total_s, predicted_bytes=prediction.bytes_per_rank,
                           predicted_hidden=prediction.hidden_fraction)
            rows.append(payload)
            print(f"  N={n} {payload['shape']:8s} T={payload['length']:6d} {payload['schedule']:10s} "
                  f"{payload['time_s'] * 1e3:9.1f} ms (model {prediction.total_s * 1e3:9.1f})", flush=True)
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    return calibration, rows


def _hidden(row: dict) -> float | None:
    if row["exposed_s"] is None:
        return 0.0
    if row["comm_alone_s"] <= 0:
        return None
    return max(0.0, min(1.0, 1.0 - row["exposed_s"] / row["comm_alone_s"]))


def print_measured(rows: list[dict], single: dict) -> None:
    header = (f"{'N':>2} {'shape':8} {'T':>6} {'schedule':10} {'ms':>9} {'model ms':>9} {'model/meas':>10} "
              f"{'MB/rank':>8} {'model MB':>8} {'exposed ms':>10} {'comm ms':>8} {'hidden':>7} {'model hidden':>12} {'vs 1 proc':>9}")
    print(header)
    print("-" * len(header))
    for row in rows:
        hidden = _hidden(row)
        exposed = "-" if row["exposed_s"] is None else f"{row['exposed_s'] * 1e3:.1f}"
        baseline = single[(row["length"], row["shape"])]
        print(f"{row['world_size']:>2} {row['shape']:8} {row['length']:>6} {row['schedule']:10} "
              f"{row['time_s'] * 1e3:>9.1f} {row['predicted_s'] * 1e3:>9.1f} {row['predicted_s'] / row['time_s']:>10.2f} "
              f"{row['sent_bytes'] / 1e6:>8.2f} {row['predicted_bytes'] / 1e6:>8.2f} {exposed:>10} "
              f"{row['comm_alone_s'] * 1e3:>8.1f} {'-' if hidden is None else f'{hidden:.0%}':>7} "
              f"{row['predicted_hidden']:>12.0%} {baseline / row['time_s']:>8.2f}x")


# ---------------------------------------------------------------- projections (cost model only)

PROJECTIONS = (
    # (hardware, N, tokens, query heads, KV heads, head dim, causal)
    (cm.A10_PCIE_MESH, 4, 24576, 32, 32, 128, False),
    (cm.A10_PCIE_MESH, 4, 24576, 32, 32, 128, True),
    (cm.A10_PCIE_SWITCH, 4, 24576, 32, 32, 128, True),
    (cm.A10_PCIE_MESH, 4, 24576, 32, 8, 128, True),
    (cm.H100_NVSWITCH, 8, 32768, 32, 32, 128, True),
    (cm.H100_NVSWITCH, 8, 131072, 32, 32, 128, True),
    (cm.H100_NVSWITCH, 8, 131072, 32, 8, 128, True),
    (cm.H100_NVSWITCH, 8, 131072, 9, 3, 64, True),
)


def projections() -> list[dict]:
    rows = []
    for hw, n, length, h_q, h_kv, d, causal in PROJECTIONS:
        shape = cm.AttentionShape(h_q, h_kv, d, dtype_bytes=2, causal=causal)
        pos = cm.prefill_positions(length, n)
        chosen, predictions = cm.choose_schedule(shape, pos, pos, hw)
        ideal = cm.predict_single_device(shape, torch.arange(length), torch.arange(length), hw) / n
        for p in predictions.values():
            rows.append({"hardware": hw.name, "world_size": n, "length": length, "heads": f"{h_q}/{h_kv}x{d}",
                         "causal": causal, "schedule": p.schedule, "chosen": p.schedule == chosen,
                         "predicted_s": p.total_s, "exposed_s": p.exposed_s, "comm_s": p.comm_s,
                         "hidden": p.hidden_fraction, "ideal_fraction": ideal / p.total_s, "bytes_per_rank": p.bytes_per_rank})
    hw = cm.H100_NVSWITCH
    for h_q, h_kv, d in ((32, 8, 128), (9, 3, 64)):
        shape = cm.AttentionShape(h_q, h_kv, d, dtype_bytes=2)
        q_pos, k_pos = cm.decode_positions(131072, 8)
        chosen, predictions = cm.choose_schedule(shape, q_pos, k_pos, hw, ("tokenring", "ring", "decode_allreduce"))
        for p in predictions.values():
            rows.append({"hardware": hw.name + " decode", "world_size": 8, "length": 131072, "heads": f"{h_q}/{h_kv}x{d}",
                         "causal": True, "schedule": p.schedule, "chosen": p.schedule == chosen, "predicted_s": p.total_s,
                         "exposed_s": p.exposed_s, "comm_s": p.comm_s, "hidden": p.hidden_fraction,
                         "ideal_fraction": None, "bytes_per_rank": p.bytes_per_rank})
    return rows


def print_projections(rows: list[dict]) -> None:
    header = (f"{'hardware':26} {'N':>2} {'T':>7} {'heads':>9} {'causal':>6} {'schedule':16} {'ms':>9} "
              f"{'exposed ms':>10} {'hidden':>7} {'of ideal':>8} {'MB/rank':>9} chosen")
    print(header)
    print("-" * len(header))
    for r in rows:
        ideal = "-" if r["ideal_fraction"] is None else f"{r['ideal_fraction']:.0%}"
        print(f"{r['hardware']:26} {r['world_size']:>2} {r['length']:>7} {r['heads']:>9} {str(r['causal']):>6} "
              f"{r['schedule']:16} {r['predicted_s'] * 1e3:>9.3f} {r['exposed_s'] * 1e3:>10.3f} {r['hidden']:>7.0%} "
              f"{ideal:>8} {r['bytes_per_rank'] / 1e6:>9.2f} {'*' if r['chosen'] else ''}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per world size before giving up")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    configs = [(length, shape) for length in args.lengths for shape in args.shapes]

    print("one process (1 thread, causal, full sequence):", flush=True)
    single = {}
    for length, shape in configs:
        single[(length, shape)] = _single_process(length, shape)
        print(f"  {shape:8s} T={length:6d} {single[(length, shape)] * 1e3:9.1f} ms", flush=True)
    calibrations, rows = {}, []
    for n in args.world_sizes:
        print(f"N={n}: spawning {n} processes", flush=True)
        calibrations[n], world_rows = run_world(n, configs, args.timeout)
        rows += world_rows

    print("\nMeasured on this machine (CPU, gloo, fp32, causal, zigzag layout), model = cost model calibrated in-run:")
    print_measured(rows, single)
    ratios = [row["predicted_s"] / row["time_s"] for row in rows]
    within = sum(0.7 <= r <= 1.3 for r in ratios)
    print(f"cost model within 30% of measured time: {within}/{len(ratios)}; "
          f"model/measured range {min(ratios):.2f}-{max(ratios):.2f}")
    bytes_exact = all(row["sent_bytes"] == row["predicted_bytes"] for row in rows)
    print(f"bytes per rank equal to the cost model in every row: {bytes_exact}")

    print("\nProjections from the cost model (bf16; assumptions in ringattn/costmodel.py and docs/ringattn.md):")
    projected = projections()
    print_projections(projected)

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "command": "python bench/ringattn.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__},
        "single_process_s": {f"{shape}/{length}": s for (length, shape), s in single.items()},
        "calibration": calibrations,
        "measured": rows,
        "cost_model_within_30pct": f"{within}/{len(ratios)}",
        "projections": projected,
    }, indent=2))
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
