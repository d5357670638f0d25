"""Ray shard group vs the in-process engine: what Ray costs with one shard, what sharding costs with two.

What it measures, in one run, side by side:

1. Workload. The engine benchmark's closed-loop workload (bench/engine.py: prompts cut from stdlib
   source, prompt and output lengths with a 30% spread, exact output lengths, fixed seed) served by the
   Ray shard group with N = 1 and with N = 2, each paired with the in-process engine (`shards = 0`): at
   every client count the in-process run comes right before the Ray run and the ratios (throughput,
   TTFT, TPOT) are against that run, so load from other work on a shared machine hits both alike. The
   in-process rows of the second pair, against the first pair's, are the noise floor: a ratio closer
   to 1 than they are says nothing. Target (from the issue): Ray N = 1 throughput within 15% of
   in-process at every client count.
2. Dispatch overhead. Steps that each decode one token of one short request, alternating between the
   in-process engine and the Ray engine: Ray's median minus in-process's is what a step's round trip
   through Ray costs. The actors' own forward time (their `step_seconds`) is also read, so the time
   spent outside the actors (scheduling, sampling, the Ray round trip) shows directly.
3. Long prompt. One prompt of ~2000 tokens on a fresh engine per N (in-process, then Ray N = 1, 2, and 3
   unless --max-shards says otherwise), each sized to hold exactly that request (KV blocks per shard =
   the request's blocks / N): prefill time (time to first token), decode step time at that context,
   peak RSS per shard, KV bytes per shard, bytes each shard sent and the ringattn schedules it ran.
   The in-process row runs in a fresh child process, so its peak RSS compares with a fresh actor's.

Each Ray engine is shut down before the next configuration starts; the in-process engine (no processes,
no cores while idle) stays up through parts 1 and 2 to pair with both. Results: tables on stdout,
progress on stderr, everything in JSON (bench/results/shards.json).

NOTE: on a 2-core machine N = 2 shards cannot be faster than one (the two replicas share the cores the
one replica had, and now also exchange KV over gloo); N = 3 oversubscribes the cores. These rows show
the cost of sharding and how memory splits, not a speedup.

Run (from the repository root; the default takes ~10-12 min on 2 shared CPU cores, --quick ~3 min):
    . .venv/bin/activate
    python bench/shards.py            # clients 1 and 4, 4 req/client, prompts ~256, outputs ~32, long 2000
    python bench/shards.py --quick    # clients 1 and 2, 1 req/client, prompts ~128, outputs ~16, long 1000
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import resource
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch


from bench.engine import (  # the same workload and metrics as the engine benchmark
    WorkItem,
    check_exact_lengths,
    load_corpus,
    make_workload,
    run_engine,
    summarize,
)
from longbow.services.config import EngineConfig, LongbowConfig, ModelSource
from longbow.services.engine.engine import LLMEngine
from longbow.services.replica import build_engine
from longbow.services.engine.scheduler import blocks_for
from longbow.services.engine.types import Request, SamplingParams
from longbow.services.engine.weights import LoadedModel, load_model, load_tokenizer

MODEL = ModelSource(device="cpu", dtype="float32")
MIB = 1 << 20
TARGET_RATIO = 0.85  # Ray N = 1 throughput >= 85% of in-process
IN_PROCESS_NAMES = ("in-process (vs N=1)", "in-process (vs N=2)")  # the runs paired with each Ray config


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def label(shards: int) -> str:
    return "in-process" if shards == 0 else f"ray N={shards}"


def make_engine(loaded: LoadedModel | None, shards: int, num_blocks: int, args) -> LLMEngine:
    engine = EngineConfig(token_budget=args.token_budget, block_size=args.block_size, num_blocks=num_blocks,
                          shards=shards, step_timeout_s=600)
    return build_engine(LongbowConfig(model=MODEL, engine=engine), loaded)


# ---- per-shard counters ------------------------------------------------------------------------------
def shard_stats(engine: LLMEngine) -> list[dict] | None:
    return engine.executor.stats()["shards"] if engine.config.engine.shards else None


def stats_delta(before: list[dict] | None, after: list[dict] | None) -> list[dict] | None:
    """Per shard: what the counters grew by between two snapshots (peak RSS and capacity as of `after`)."""
    if before is None or after is None:
        return None
    deltas = []
    for old, new in zip(before, after):
        schedules = {k: v - old["schedules"].get(k, 0) for k, v in new["schedules"].items()}
        deltas.append({
            "rank": new["rank"], "steps": new["steps"] - old["steps"],
            "step_seconds": new["step_seconds"] - old["step_seconds"],
            "bytes_sent": new["bytes_sent"] - old["bytes_sent"],
            "bytes_received": new["bytes_received"] - old["bytes_received"],
            "schedules": {k: v for k, v in schedules.items() if v},
            "peak_rss_bytes": new["peak_rss_bytes"], "kv_blocks_total": new["kv_blocks_total"],
        })
    return deltas


def shard_columns(deltas: list[dict] | None) -> dict:
    """The per-shard counters folded into row columns: the busiest shard's bytes, and the schedules as
    rank 0 counted them (one per request per step; every rank makes the same choice)."""
    if deltas is None:
        return {}
    return {"per_shard": deltas, "mib_sent_per_shard": max(d["bytes_sent"] for d in deltas) / MIB,
            "mib_received_per_shard": max(d["bytes_received"] for d in deltas) / MIB,
            "schedules": deltas[0]["schedules"]}


# ---- 1 + 2: the workload and one-token decode steps ---------------------------------------------------
def decode_step_times(engines: dict[str, LLMEngine], prompt: list[int], steps: int) -> list[dict]:
    """Wall time of `steps` engine steps that each decode one token of a single short request, split into
    the model forward (an actor's `step_seconds`; in-process, a timer around the runner's forward) and the
    rest of the step (scheduling, sampling and, for Ray, the round trip to the actors).

    NOTE: the engines' steps alternate (A, B, A, B, ...), so load from other work on a shared machine
    hits both alike; timed back to back, drift between the two blocks swamped a few-ms difference."""
    params = SamplingParams(max_tokens=steps + 4, min_tokens=steps + 4)
    for engine in engines.values():
        engine.add_request(Request("decode-probe", prompt, params))
        while not engine.step():  # the prompt's prefill (one chunk) yields the first token
            pass
        engine.step()  # one untimed decode step: the first one after a prefill may allocate
    before = {name: shard_stats(engine) for name, engine in engines.items()}
    durations = {name: None if before[name] else time_forward(engine) for name, engine in engines.items()}
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(steps):
        for name, engine in engines.items():
            started = time.perf_counter()
            events = engine.step()
            times[name].append(time.perf_counter() - started)
            assert len(events) == 1 and events[0].token_id is not None, "the probe step decoded no token"
    results = []
    for name, engine in engines.items():
        if durations[name] is not None:
            untime_forward(engine)
        forward = forward_mean_s(durations[name], stats_delta(before[name], shard_stats(engine)))
        while engine.has_unfinished():
            engine.step()
        mean = statistics.fmean(times[name])
        results.append({"system": name, "steps": steps, "step_p50_s": statistics.median(times[name]),
                        "step_mean_s": mean, "forward_mean_s": forward,
                        "outside_forward_mean_s": mean - forward})
    return results


def time_forward(engine: LLMEngine) -> list[float]:
    """Times the in-process runner's forward passes until untime_forward (an actor times its own)."""
    # NOTE: the in-process Worker runs a step through `runner.run` (forward pass to logits; sampling
    # follows outside it), the part an actor's `step_seconds` also covers, minus the actor's sampling.
    runner, durations = engine.executor.runner, []
    run = runner.run

    def timed(plan):
        started = time.perf_counter()
        try:
            return run(plan)
        finally:
            durations.append(time.perf_counter() - started)

    runner.run = timed
    return durations


def untime_forward(engine: LLMEngine) -> None:
    del engine.executor.runner.run  # the instance attribute time_forward set: the class's method again


def forward_mean_s(durations: list[float] | None, deltas: list[dict] | None) -> float:
    """Mean model forward per step: the in-process timer's, or the slowest shard's (the step waits for it)."""
    if durations is not None:
        return statistics.fmean(durations)
    return max(d["step_seconds"] / d["steps"] for d in deltas)


def run_workload(engine: LLMEngine, name: str, clients: int, corpus: list[int], args) -> dict:
    workload = make_workload(corpus, clients, args)
    before, steps, preempted = shard_stats(engine), engine.steps, engine.scheduler.num_preemptions
    durations = time_forward(engine) if before is None else None
    started = time.perf_counter()
    try:
        traces = run_engine(engine, workload)
    finally:
        if durations is not None:
            untime_forward(engine)
    check_exact_lengths(traces)
    deltas = stats_delta(before, shard_stats(engine))
    row = {"system": name, "shards": engine.config.engine.shards, "clients": clients,
           **summarize(traces, started, args), "steps": engine.steps - steps,
           "preemptions": engine.scheduler.num_preemptions - preempted, **shard_columns(deltas),
           "load_average": os.getloadavg()[0]}
    # NOTE: makespan / steps, not timed steps: run_engine is bench/engine.py's; the client bookkeeping
    # it adds between steps is microseconds
    row["step_mean_s"] = row["makespan_s"] / row["steps"]
    row["forward_mean_s"] = forward_mean_s(durations, deltas)
    row["outside_forward_mean_s"] = row["step_mean_s"] - row["forward_mean_s"]
    progress(f"{name} clients={clients}: {row['requests']} requests in {row['makespan_s']:.1f} s, "
             f"{row['throughput_tok_s']:.1f} tok/s, TTFT p50 {row['ttft_p50_s']:.2f} s, "
             f"TPOT p50 {row['tpot_p50_s'] * 1e3:.0f} ms, step {row['step_mean_s'] * 1e3:.0f} ms of which "
             f"forward {row['forward_mean_s'] * 1e3:.0f} ms")
    return row


def compare_with_ray(in_process: LLMEngine, shards: int, loaded: LoadedModel, corpus: list[int], args,
                     in_process_name: str) -> tuple[list[dict], list[dict]]:
    """Ray with `shards` shards against the (already warm) in-process engine, in pairs: at each client
    count the in-process run comes right before the Ray run, so both see the same load from other work.
    Returns the workload rows and the decode probe; the Ray engine is shut down before returning."""
    name = label(shards)
    progress(f"{name}: starting engine")
    started = time.perf_counter()
    engine = make_engine(loaded, shards, args.workload_blocks, args)
    try:
        startup_s = time.perf_counter() - started
        run_engine(engine, [[WorkItem(corpus[:32], 4)]])  # warm-up: first-step allocations, Ray's first calls
        rows = []
        for clients in args.clients:
            rows.append(run_workload(in_process, in_process_name, clients, corpus, args))
            rows.append({**run_workload(engine, name, clients, corpus, args), "engine_startup_s": startup_s})
        for in_process_row, ray_row in zip(rows[::2], rows[1::2]):
            add_ratios(ray_row, in_process_row)
        probe = decode_step_times({in_process_name: in_process, name: engine}, corpus[:16], args.probe_steps)
        base, ray_probe = probe
        ray_probe["step_x"] = ray_probe["step_p50_s"] / base["step_p50_s"]
        ray_probe["step_minus_in_process_s"] = ray_probe["step_p50_s"] - base["step_p50_s"]
        # the time a step spends outside the model beyond what the in-process step does: Ray's dispatch
        overhead = ray_probe["outside_forward_mean_s"] - base["outside_forward_mean_s"]
        ray_probe["dispatch_overhead_s"] = overhead
        progress(f"one-token decode step p50: {in_process_name} {base['step_p50_s'] * 1e3:.1f} ms, {name} "
                 f"{ray_probe['step_p50_s'] * 1e3:.1f} ms, dispatch overhead {overhead * 1e3:+.1f} ms")
    finally:
        engine.shutdown()
    return rows, probe


# ---- 3: the long prompt --------------------------------------------------------------------------------
def long_prompt_run(loaded: LoadedModel, shards: int, prompt: list[int], args) -> dict:
    """Prefill one long prompt on a fresh engine holding exactly that request, then a few decode steps."""
    total_blocks = blocks_for(len(prompt) + args.long_output_tokens, args.block_size)
    per_shard = math.ceil(total_blocks / max(shards, 1))
    engine = make_engine(loaded, shards, per_shard, args)
    try:
        idle = shard_stats(engine)
        # in-process, this process's own peak RSS: meaningful only in a fresh process (see below)
        idle_rss = max(s["peak_rss_bytes"] for s in idle) if idle else _peak_rss_bytes()
        params = SamplingParams(max_tokens=args.long_output_tokens, min_tokens=args.long_output_tokens)
        engine.add_request(Request("long", prompt, params))
        started, token_times, prefill_steps = time.perf_counter(), [], 0
        while engine.has_unfinished():
            events = engine.step()
            prefill_steps += not token_times
            token_times += [time.perf_counter() for e in events if e.token_id is not None]
        if len(token_times) != args.long_output_tokens:
            raise RuntimeError(f"long prompt: {len(token_times)} tokens, not {args.long_output_tokens}")
        deltas = stats_delta(idle, shard_stats(engine))
        peak_rss = max(d["peak_rss_bytes"] for d in deltas) if deltas else _peak_rss_bytes()
    finally:
        engine.shutdown()
    gaps = [b - a for a, b in zip(token_times, token_times[1:])]
    kv_bytes = per_shard * args.block_size * kv_bytes_per_token(loaded)
    return {
        "system": label(shards), "shards": shards, "prompt_tokens": len(prompt),
        "prefill_steps": prefill_steps,
        "prefill_s": token_times[0] - started, "decode_step_s": statistics.median(gaps) if gaps else None,
        "kv_blocks_per_shard": per_shard, "kv_mib_per_shard": kv_bytes / MIB,
        "peak_rss_mib_idle": idle_rss / MIB, "peak_rss_mib_per_shard": peak_rss / MIB,
        **shard_columns(deltas), "load_average": os.getloadavg()[0],
    }


def kv_bytes_per_token(loaded: LoadedModel) -> int:
    a = loaded.args
    return 2 * a.n_layers * a.n_kv_heads * a.head_dim * loaded.dtype.itemsize


def long_prompt_in_fresh_process(prompt: list[int], threads: int, args) -> dict:
    """The in-process engine in a child process, so its peak RSS is a fresh process's, like an actor's."""
    torch.set_num_threads(threads)
    row = long_prompt_run(load_model(MODEL), 0, prompt, args)
    return {**row, "system": f"in-process, {threads} thread{'s' * (threads > 1)}", "threads": threads}


def _peak_rss_bytes() -> int:
    """This process's peak RSS. NOTE: VmHWM, not getrusage's ru_maxrss: a spawned child inherits the
    parent's ru_maxrss across fork + exec (the child reported the 1.2 GiB driver's peak before it had
    loaded anything), while VmHWM belongs to the child's own address space."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux: the best there is


def run_long_prompts(loaded: LoadedModel, corpus: list[int], args) -> list[dict]:
    """In-process with one thread (the workload's setting) and with every core, then Ray N = 1 .. max."""
    prompt, rows = corpus[-args.long_prompt_tokens:], []
    thread_counts = sorted({args.threads or torch.get_num_threads(), os.cpu_count() or 1})
    systems = [("in-process", t) for t in thread_counts] + [("ray", n) for n in range(1, args.max_shards + 1)]
    for kind, count in systems:
        unit = "threads" if kind == "in-process" else "shards"
        progress(f"long prompt ({len(prompt)} tokens): {kind}, {unit} = {count}")
        if kind == "in-process":
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                row = pool.submit(long_prompt_in_fresh_process, prompt, count, args).result()
        else:
            row = long_prompt_run(loaded, count, prompt, args)
        rows.append(row)
        progress(f"{row['system']}: prefill {row['prefill_s']:.2f} s, peak RSS/shard "
                 f"{row['peak_rss_mib_per_shard']:.0f} MiB, "
                 f"sent/shard {row.get('mib_sent_per_shard', 0):.1f} MiB")
    return rows


# ---- ratios, target, tables ------------------------------------------------------------------------------
RATIO_KEYS = {"throughput_tok_s": "throughput_x", "ttft_p50_s": "ttft_p50_x", "tpot_p50_s": "tpot_p50_x"}


def add_ratios(row: dict, reference: dict) -> dict:
    """Throughput, TTFT and TPOT of `row` as multiples of the reference run's."""
    for key, ratio in RATIO_KEYS.items():
        row[ratio] = row[key] / reference[key]
    return row


def check_target(workload: list[dict]) -> dict:
    ray1 = [r for r in workload if r["system"] == "ray N=1"]
    again = [r for r in workload if r["system"] == IN_PROCESS_NAMES[1]]
    worst = min(r["throughput_x"] for r in ray1)
    return {"target": "Ray N=1 throughput within 15% of in-process (ratio >= 0.85) at every client count",
            "ratios": {r["clients"]: r["throughput_x"] for r in ray1}, "worst": worst,
            "met": worst >= TARGET_RATIO, "noise_floor": {r["clients"]: r["throughput_x"] for r in again}}


def sharding_cost(workload: list[dict]) -> list[dict]:
    """Per client count: Ray N = 2 against Ray N = 1 on the same cores, throughput and per-token time
    (TPOT p50). Each Ray run is also against its own in-process partner (thr x), so the row gives both
    the direct ratio and the load-corrected one (N=2's thr x / N=1's thr x)."""
    rows = []
    by_key = {(r["system"], r["clients"]): r for r in workload}
    for clients in sorted({r["clients"] for r in workload}):
        one, two = by_key.get(("ray N=1", clients)), by_key.get(("ray N=2", clients))
        if one is None or two is None:
            continue
        rows.append({"clients": clients, "n1_tok_s": one["throughput_tok_s"], "n2_tok_s": two["throughput_tok_s"],
                     "n2_over_n1": two["throughput_tok_s"] / one["throughput_tok_s"],
                     "n2_over_n1_load_corrected": two["throughput_x"] / one["throughput_x"],
                     "n1_tpot_ms": one["tpot_p50_s"] * 1e3, "n2_tpot_ms": two["tpot_p50_s"] * 1e3,
                     "n1_step_ms": one["step_mean_s"] * 1e3, "n2_step_ms": two["step_mean_s"] * 1e3})
    return rows


SHARDING_COLUMNS = [
    ("clients", "clients", "{}"), ("N=1 tok/s", "n1_tok_s", "{:.2f}"), ("N=2 tok/s", "n2_tok_s", "{:.2f}"),
    ("N=2/N=1", "n2_over_n1", "{:.2f}"), ("N=2/N=1 vs in-process", "n2_over_n1_load_corrected", "{:.2f}"),
    ("N=1 TPOT ms", "n1_tpot_ms", "{:.0f}"), ("N=2 TPOT ms", "n2_tpot_ms", "{:.0f}"),
    ("N=1 step ms", "n1_step_ms", "{:.0f}"), ("N=2 step ms", "n2_step_ms", "{:.0f}"),
]


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    def cell(row: dict, key: str, fmt: str) -> str:
        value = row.get(key)
        return fmt.format(value) if value is not None else "-"

    table = [[h for h, _, _ in columns]] + [[cell(r, k, f) for _, k, f in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    lines = [" | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths)))
             for line in table]
    lines.insert(1, "-|-".join("-" * w for w in widths))
    return "\n".join(lines)


WORKLOAD_COLUMNS = [  # header, key, format
    ("system", "system", "{}"), ("clients", "clients", "{}"), ("tok/s", "throughput_tok_s", "{:.2f}"),
    ("thr x", "throughput_x", "{:.2f}"), ("TTFT p50 s", "ttft_p50_s", "{:.2f}"),
    ("TTFT p95 s", "ttft_p95_s", "{:.2f}"), ("TTFT x", "ttft_p50_x", "{:.2f}"),
    ("TPOT p50 ms", "tpot_p50_ms", "{:.0f}"), ("TPOT p95 ms", "tpot_p95_ms", "{:.0f}"),
    ("TPOT x", "tpot_p50_x", "{:.2f}"), ("steps", "steps", "{}"), ("step ms", "step_mean_ms", "{:.0f}"),
    ("forward ms", "forward_ms", "{:.0f}"), ("MiB sent/shard", "mib_sent_per_shard", "{:.1f}"),
    ("schedules", "schedules_text", "{}"),
]
DISPATCH_COLUMNS = [
    ("system", "system", "{}"), ("step p50 ms", "step_p50_ms", "{:.1f}"), ("step x", "step_x", "{:.2f}"),
    ("minus in-process ms", "step_minus_in_process_ms", "{:+.1f}"),
    ("step mean ms", "step_mean_ms", "{:.1f}"),
    ("forward ms", "forward_ms", "{:.1f}"), ("outside forward ms", "outside_forward_ms", "{:.1f}"),
    ("dispatch overhead ms", "dispatch_overhead_ms", "{:+.1f}"),
]
LONG_COLUMNS = [
    ("system", "system", "{}"), ("prompt", "prompt_tokens", "{}"), ("prefill s", "prefill_s", "{:.2f}"),
    ("prefill x", "prefill_x", "{:.2f}"), ("decode ms", "decode_step_ms", "{:.0f}"),
    ("KV MiB/shard", "kv_mib_per_shard", "{:.1f}"), ("RSS idle MiB", "peak_rss_mib_idle", "{:.0f}"),
    ("peak RSS MiB/shard", "peak_rss_mib_per_shard", "{:.0f}"),
    ("MiB sent/shard", "mib_sent_per_shard", "{:.1f}"),
    ("schedules", "schedules_text", "{}"),
]

MILLISECOND_KEYS = {
    "tpot_p50_s": "tpot_p50_ms", "tpot_p95_s": "tpot_p95_ms", "step_p50_s": "step_p50_ms",
    "step_mean_s": "step_mean_ms", "forward_mean_s": "forward_ms",
    "outside_forward_mean_s": "outside_forward_ms",
    "step_minus_in_process_s": "step_minus_in_process_ms", "dispatch_overhead_s": "dispatch_overhead_ms",
    "decode_step_s": "decode_step_ms",
}


def for_display(row: dict) -> dict:
    """Milliseconds and a schedule summary for the tables (the JSON keeps seconds and the dicts)."""
    shown = dict(row)
    for seconds, millis in MILLISECOND_KEYS.items():
        if row.get(seconds) is not None:
            shown[millis] = row[seconds] * 1e3
    if "schedules" in row:
        shown["schedules_text"] = " ".join(f"{k}:{v}" for k, v in sorted(row["schedules"].items())) or "local"
    return shown


def machine_info() -> dict:
    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "load_average": os.getloadavg()}


# ---- the run ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="~3 min: smaller workload, long prompt 1000, N <= 2")
    p.add_argument("--clients", type=int, nargs="+", help="client counts (default 1 4; quick: 1 2)")
    p.add_argument("--requests-per-client", type=int, help="default 4 (quick: 1)")
    p.add_argument("--prompt-tokens", type=int, help="mean prompt length (default 256; quick: 128)")
    p.add_argument("--output-tokens", type=int, help="mean output length (default 32; quick: 16)")
    p.add_argument("--long-prompt-tokens", type=int, help="the long prompt (default 2000; quick: 1000)")
    p.add_argument("--long-output-tokens", type=int, default=4, help="tokens generated after the long prompt")
    p.add_argument("--max-shards", type=int, help="long prompt for N = 1 .. this (default 3; quick: 2)")
    p.add_argument("--no-long", action="store_true", help="skip part 3 (the long prompt)")
    p.add_argument("--probe-steps", type=int, help="timed one-token decode steps (default 40; quick: 15)")
    p.add_argument("--spread", type=float, default=0.3, help="std of lengths as a fraction of the mean")
    p.add_argument("--token-budget", type=int, default=512, help="tokens per forward pass")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--workload-blocks", type=int, default=256, help="KV blocks per shard for the workload")
    p.add_argument("--seed", type=int, default=0)
    # NOTE: one intra-op thread, as in bench/engine.py (two threads on shared cores stall on each other);
    # Ray gives each 1-CPU actor OMP_NUM_THREADS=1, so every system computes on one thread per replica.
    p.add_argument("--threads", type=int, default=1, help="in-process torch intra-op threads (0: torch's)")
    p.add_argument("--slo-prompt-tok-s", type=float, default=512.0, help=argparse.SUPPRESS)  # for summarize()
    p.add_argument("--slo-token-rate", type=float, default=4.0, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "shards.json")
    args = p.parse_args(argv)
    quick = {"clients": [1, 2], "requests_per_client": 1, "prompt_tokens": 128, "output_tokens": 16,
             "long_prompt_tokens": 1000, "max_shards": 2, "probe_steps": 15}
    full = {"clients": [1, 4], "requests_per_client": 4, "prompt_tokens": 256, "output_tokens": 32,
            "long_prompt_tokens": 2000, "max_shards": 3, "probe_steps": 40}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import ray

    started, machine = time.perf_counter(), machine_info()
    # NOTE: more logical CPUs than the machine has, so a placement group of max_shards 1-CPU bundles fits
    # (ShardGroup's own ray.init would register only os.cpu_count() CPUs and N = 3 would never place).
    ray.init(num_cpus=max(4, args.max_shards), include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    try:
        loaded = load_model(MODEL)
        corpus = load_corpus(load_tokenizer(loaded.checkpoint))
        in_process = make_engine(loaded, 0, args.workload_blocks, args)
        run_engine(in_process, [[WorkItem(corpus[:32], 4)]])  # warm-up
        workload, dispatch = [], []
        for shards, in_process_name in zip((1, 2), IN_PROCESS_NAMES):
            rows, probe = compare_with_ray(in_process, shards, loaded, corpus, args, in_process_name)
            workload, dispatch = workload + rows, dispatch + probe
        first = {r["clients"]: r for r in workload if r["system"] == IN_PROCESS_NAMES[0]}
        for row in workload:
            if row["system"] in IN_PROCESS_NAMES:
                add_ratios(row, first[row["clients"]])  # the second pair's in-process rows: the noise floor
        in_process.shutdown()
        long_rows = [] if args.no_long else run_long_prompts(loaded, corpus, args)
    finally:
        ray.shutdown()
    for row in long_rows:
        row["prefill_x"] = row["prefill_s"] / long_rows[0]["prefill_s"]
    target = check_target(workload)
    sharding = sharding_cost(workload)
    print(format_table([for_display(r) for r in workload], WORKLOAD_COLUMNS))
    print()
    print(format_table([for_display(r) for r in dispatch], DISPATCH_COLUMNS))
    print()
    print(format_table(sharding, SHARDING_COLUMNS))
    print()
    if long_rows:
        print(format_table([for_display(r) for r in long_rows], LONG_COLUMNS))
        print()
    ratios = ", ".join(f"{v:.2f}x at {c} clients" for c, v in target["ratios"].items())
    noise = ", ".join(f"{v:.2f}x" for v in target["noise_floor"].values())
    print(f"{'MET ' if target['met'] else 'MISS'}  {target['target']}: {ratios} "
          f"(noise floor, in-process run again later: {noise})")
    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {**machine, "load_average_end": os.getloadavg()}, "wall_s": time.perf_counter() - started,
        "workload": workload, "dispatch": dispatch, "long_prompt": long_rows, "target": target,
        "sharding": sharding,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    progress(f"wrote {args.out} after {result['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
