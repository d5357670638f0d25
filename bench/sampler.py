"""Benchmark: the batched device sampler (`sample_batch`) vs today's per-request sampler, side by side.

Per step and batch size R (vocabulary 49,152, SmolLM2's), greedy and sampled (temperature 0.8,
top-p 0.95), each path timed end to end as the worker would run it:
- per-row: what worker.Sampler._sample does for each request (entropy and log-probs, `sample_row` with
  the request's torch.Generator, two float() reads), one request after another;
- batched: `SamplingControls.build` (one host-to-device copy), `sample_batch`, `SampledBatch.to_host`
  (one device-to-host copy).
Logits are already on the device in both (the forward left them there). Median over repetitions. On CPU
the clock is this process's CPU time (the machine is shared, so wall time measures the neighbours);
on CUDA it is wall time. `--compile` adds `sample_batch` under torch.compile (compile time not counted).

    python bench/sampler.py --threads 1     # CPU
    python bench/sampler.py --device cuda --compile
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from longbow.services.engine.sampler import (
    SamplingControls,
    entropy_and_logprobs,
    new_generator,
    sample_batch,
    sample_row,
)
from longbow.services.engine.types import SamplingParams

VOCAB = 49_152
EOS = (0,)
MODES = {"greedy": SamplingParams(), "sampled": SamplingParams(temperature=0.8, top_p=0.95)}
RESULTS = Path(__file__).resolve().parent / "results" / "sampler.json"


def per_row_step(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> list[int]:
    tokens = []
    for row, (p, generator) in enumerate(zip(params, generators)):
        entropy, logprobs = entropy_and_logprobs(logits[row].unsqueeze(0))
        token = sample_row(logits[row], p, generator)
        float(logprobs[0, token]), float(entropy[0])
        tokens.append(token)
    return tokens


def batched_step(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int], step: int,
                 sample=sample_batch) -> list[int]:
    controls = SamplingControls.build(params, seeds, [step] * len(params), EOS, logits.device)
    return sample(logits, controls).to_host().token_ids


def median_ms(run, device: torch.device, min_reps: int = 5, budget_s: float = 1.0) -> float:
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    run(0)  # warm-up (allocator, kernels, compilation)
    times, start = [], time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < budget_s:
        if device.type == "cuda":
            torch.cuda.synchronize()
        begin = clock()
        run(len(times) + 1)  # both paths end on a host read, so no synchronize is needed after
        times.append(clock() - begin)
        if len(times) >= 200:
            break
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--compile", action="store_true", help="also time sample_batch under torch.compile")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    compiled = torch.compile(sample_batch, fullgraph=True, dynamic=False) if args.compile else None
    results = []
    print(f"{'R':>4} {'mode':>8} {'per-row ms':>11} {'batched ms':>11} {'speed-up':>9}"
          + (f" {'compiled ms':>12} {'speed-up':>9}" if compiled else ""))
    for rows in args.rows:
        logits = torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(rows)).mul(3).to(device)
        seeds = list(range(rows))
        for mode, p in MODES.items():
            params = [p] * rows
            generators = [new_generator(s, device) for s in seeds]
            per_row = median_ms(lambda _: per_row_step(logits, params, generators), device)
            batched = median_ms(lambda step: batched_step(logits, params, seeds, step), device)
            row = {"rows": rows, "mode": mode, "per_row_ms": round(per_row, 4),
                   "batched_ms": round(batched, 4), "speedup": round(per_row / batched, 2)}
            line = f"{rows:>4} {mode:>8} {per_row:>11.3f} {batched:>11.3f} {per_row / batched:>8.2f}x"
            if compiled:
                fused = median_ms(lambda step: batched_step(logits, params, seeds, step, compiled), device)
                row.update(compiled_ms=round(fused, 4), compiled_speedup=round(per_row / fused, 2))
                line += f" {fused:>12.3f} {per_row / fused:>8.2f}x"
            results.append(row)
            print(line, flush=True)
    RESULTS.parent.mkdir(exist_ok=True)
    record = {"device": str(device), "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "clock": "wall" if device.type == "cuda" else "process CPU time",
              "torch": torch.__version__, "vocab": VOCAB, "results": results}
    RESULTS.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
