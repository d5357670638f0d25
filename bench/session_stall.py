"""What an edit session's open costs the other streams (issue 16): a stream's inter-token gaps while a
session opens an N-token document, three ways in one run on the real model:

- alone: the stream with no session (its own gaps: the reference);
- paced: the open as a KV job (engine/jobs.py, how the gateway runs it): its passes ride in the engine's
  steps beside the stream, as many tokens per step as keep a step within `engine.document_step_ratio` x
  the stream's step alone (jobs.DocumentPacer, measured step times), `engine.document_tokens` at most;
- fixed-share: the same without pacing (ratio 0): `engine.document_tokens` tokens every step;
- blocking: the same open run to its end as one call on the engine thread (how OpenSession ran before
  jobs): the stream gets no token until the open has finished.

The gaps counted are those between tokens of one request that arrive while the open runs (and the first
after it). Target (issue 16): the paced max gap <= 2x the stream's max gap alone. Should the stream's
request end during the open, the wait of the next one for its first token is shown apart: it may queue
behind a document-only step, which takes the whole token budget.

    python bench/session_stall.py                       # 8,000-token document, CPU, the bundled model
    python bench/session_stall.py --doc-tokens 2000     # quicker
    python bench/session_stall.py --modes paced         # the default engine only
Table on stdout, progress on stderr, JSON in bench/results/session_stall.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch

from longbow.services.config import EngineConfig, LongbowConfig, ModelSource, SessionsConfig
from longbow.services.engine.engine import AsyncLLMEngine, LLMEngine
from longbow.services.engine.jobs import DocumentPacer
from longbow.services.engine.types import Request, SamplingParams
from longbow.services.engine.weights import load_model, load_tokenizer
from longbow.services.text.sessions import SessionManager

ROOT = Path(__file__).resolve().parent.parent
STREAM_REQUEST_TOKENS = 4096  # tokens per request of the measured stream (see stream_tokens)
MODES = ("paced", "fixed-share", "blocking")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--doc-tokens", type=int, default=8000, help="tokens of the document the session opens")
    p.add_argument("--document-tokens", type=int, default=0,
                   help="engine.document_tokens (document tokens per step beside requests); 0: engine default")
    p.add_argument("--document-step-ratio", type=float, default=EngineConfig.document_step_ratio,
                   help="engine.document_step_ratio of the paced mode (a shared step's time / the step alone)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--alone-tokens", type=int, default=48, help="tokens of the stream measured alone")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "session_stall.json"))
    return p.parse_args(argv)


def document_text(tokenizer, tokens: int) -> str:
    """Standard-library source (sorted, reproducible) cut to about `tokens` tokens."""
    pieces, count = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        pieces.append(text)
        count += len(tokenizer(text, add_special_tokens=False).input_ids)
        if count >= tokens:
            break
    ids = tokenizer("".join(pieces), add_special_tokens=False).input_ids[:tokens]
    return tokenizer.decode(ids)


async def stream_tokens(engine: AsyncLLMEngine, prompt: list[int], arrivals: list[tuple[float, int]],
                        stop: asyncio.Event, limit: int, per_request: int = STREAM_REQUEST_TOKENS) -> None:
    """Generate until `stop` is set (or `limit` tokens), recording each token's (arrival time, request
    number). One request of `per_request` tokens outlasts an 8k open on this CPU; should it end, the next is
    submitted at once (the gap across that boundary is a new request's wait, counted apart)."""
    request = 0
    while not stop.is_set() and len(arrivals) < limit:
        request += 1
        params = SamplingParams(max_tokens=min(per_request, limit - len(arrivals)), ignore_eos=True)
        events = engine.stream(Request(f"stream-{request}-{time.monotonic_ns()}", prompt, params))
        try:
            async for event in events:
                if event.token_id is not None:
                    arrivals.append((time.perf_counter(), request))
                if stop.is_set() or len(arrivals) >= limit:
                    return
        finally:
            await events.aclose()


def gaps_between(arrivals: list[tuple[float, int]], start: float,
                 end: float) -> tuple[list[float], list[float]]:
    """Gaps between consecutive arrivals from the last one before `start` to the first one after `end`:
    (inter-token gaps within a request, gaps across request boundaries)."""
    before = [a for a in arrivals if a[0] <= start]
    after = [a for a in arrivals if a[0] > end]
    window = ([before[-1]] if before else []) + [a for a in arrivals if start < a[0] <= end] + after[:1]
    pairs = list(zip(window, window[1:]))
    return ([b[0] - a[0] for a, b in pairs if a[1] == b[1]], [b[0] - a[0] for a, b in pairs if a[1] != b[1]])


async def run_open(engine: AsyncLLMEngine, manager: SessionManager, text: str, mode: str, prompt: list[int],
                   limit: int) -> dict:
    arrivals: list[tuple[float, int]] = []
    stop = asyncio.Event()
    stream = asyncio.create_task(stream_tokens(engine, prompt, arrivals, stop, limit))
    while len(arrivals) < 8:  # the stream is decoding steadily before the open starts
        await asyncio.sleep(0.005)
    steps_before = await engine.call(lambda llm: llm.steps)
    start = time.perf_counter()
    if mode == "blocking":  # the whole open inside one engine-thread call: the old OpenSession
        session = await engine.call(lambda llm: _open_whole_budget(llm, manager, text))
    else:
        session = await engine.run_job(manager.open_job(text))
    end = time.perf_counter()
    steps = await engine.call(lambda llm: llm.steps) - steps_before
    tokens_during = sum(1 for t, _ in arrivals if start < t <= end)
    while not [t for t, _ in arrivals if t > end]:
        await asyncio.sleep(0.005)
    stop.set()
    await stream
    await engine.call(lambda _engine: manager.close(session.session_id))
    gaps, boundaries = gaps_between(arrivals, start, end)
    return {"open_s": end - start, "document_tokens": len(session.document.token_ids), "steps": steps,
            "stream_tokens_during_open": tokens_during, "max_gap_ms": 1e3 * max(gaps),
            "median_gap_ms": 1e3 * statistics.median(gaps), "gaps": len(gaps),
            "p99_gap_ms": 1e3 * (statistics.quantiles(gaps, n=100, method="inclusive")[98] if len(gaps) > 1
                                 else gaps[0]),
            "all_gaps_ms": [round(1e3 * g, 1) for g in gaps],
            "request_boundary_gaps_ms": [1e3 * g for g in boundaries]}


def _open_whole_budget(llm: LLMEngine, manager: SessionManager, text: str):
    """The old OpenSession: the document's passes take whole steps (the full token budget) until done,
    the stream's decodes riding along unseen (their tokens are held until the call returns)."""
    with fixed_share(llm, llm.scheduler.token_budget):
        return manager.open(text)


@contextlib.contextmanager
def fixed_share(llm: LLMEngine, rows: int):
    """The engine with an unpaced document share of `rows` tokens per step beside requests, then as it was."""
    paced, llm.pacer = llm.pacer, DocumentPacer(rows, ratio=0)
    try:
        yield
    finally:
        llm.pacer = paced


async def run_alone(engine: AsyncLLMEngine, prompt: list[int], tokens: int) -> dict:
    arrivals: list[tuple[float, int]] = []
    await stream_tokens(engine, prompt, arrivals, asyncio.Event(), tokens)
    times = [t for t, _ in arrivals]
    gaps = [b - a for a, b in zip(times[4:], times[5:])]  # after the prompt's prefill and warm-up
    return {"max_gap_ms": 1e3 * max(gaps), "median_gap_ms": 1e3 * statistics.median(gaps), "gaps": len(gaps)}


async def main_async(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    log("loading the bundled model (first run converts it, ~30 s)")
    loaded = load_model(ModelSource(device="cpu", dtype="float32"))
    tokenizer = load_tokenizer(loaded.checkpoint)
    config = LongbowConfig(engine=EngineConfig(document_tokens=args.document_tokens,
                                               document_step_ratio=args.document_step_ratio),
                           sessions=SessionsConfig(max_document_tokens=max(16384, args.doc_tokens)))
    llm = LLMEngine(config, loaded)
    engine = AsyncLLMEngine(llm)
    manager = SessionManager(llm, tokenizer, config.sessions)
    text = document_text(tokenizer, args.doc_tokens)
    prompt = tokenizer("Write a long story about a lighthouse keeper who", add_special_tokens=False).input_ids
    limit = 1_000_000  # the stream runs until the open has finished and one more token arrived
    results = {"document_tokens_per_step": llm.pacer.max_rows, "document_step_ratio": llm.pacer.ratio,
               "token_budget": llm.scheduler.token_budget, "load_average_before": os.getloadavg()}
    try:
        log("warm-up: a short open and a short stream")
        await run_open(engine, manager, text[:2000], "paced", prompt, limit)
        log(f"stream alone ({args.alone_tokens} tokens)")
        results["alone"] = await run_alone(engine, prompt, args.alone_tokens)
        for mode in args.modes:
            log(f"{mode}: opening a {args.doc_tokens}-token document beside the stream")
            share = fixed_share(llm, llm.pacer.max_rows) if mode == "fixed-share" else contextlib.nullcontext()
            with share:
                results[mode] = await run_open(engine, manager, text, mode, prompt, limit)
            results[mode]["max_gap_vs_alone"] = results[mode]["max_gap_ms"] / results["alone"]["max_gap_ms"]
            limit_ms = 2 * results["alone"]["max_gap_ms"]
            results[mode]["gaps_over_2x_alone"] = sum(g > limit_ms for g in results[mode]["all_gaps_ms"])
            log(f"{mode}: open {results[mode]['open_s']:.1f} s, max gap {results[mode]['max_gap_ms']:.0f} ms")
    finally:
        engine.shutdown()
    return results


def table(results: dict) -> str:
    alone = results["alone"]
    rows = ["| stream | open s | steps | tokens during open | max gap ms | p99 gap ms | median gap ms "
            "| max gap / alone | gaps > 2x alone | new-request waits ms |",
            "|---|---|---|---|---|---|---|---|---|---|",
            f"| alone | - | - | - | {alone['max_gap_ms']:.0f} | - | {alone['median_gap_ms']:.0f} | 1.00 | - | - |"]
    for mode in MODES:
        if mode not in results:
            continue
        r = results[mode]
        rows.append(f"| {mode} open | {r['open_s']:.1f} | {r['steps']} | {r['stream_tokens_during_open']} | "
                    f"{r['max_gap_ms']:.0f} | {r['p99_gap_ms']:.0f} | {r['median_gap_ms']:.0f} | "
                    f"{r['max_gap_vs_alone']:.2f} | {r['gaps_over_2x_alone']} | "
                    f"{', '.join(f'{g:.0f}' for g in r['request_boundary_gaps_ms']) or 'none'} |")
    return "\n".join(rows)


def main(argv=None) -> None:
    args = parse_args(argv)
    results = asyncio.run(main_async(args))
    results["args"] = vars(args)
    results["environment"] = {"python": platform.python_version(), "torch": torch.__version__,
                              "threads": torch.get_num_threads(), "machine": platform.machine(),
                              "load_average_after": os.getloadavg()}
    first = next(results[mode] for mode in MODES if mode in results)
    print(f"document {first['document_tokens']} tokens; beside requests at most "
          f"{results['document_tokens_per_step']} per step, paced to {results['document_step_ratio']}x the "
          f"step alone (token budget {results['token_budget']})")
    print(table(results))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    log(f"JSON: {out}")


if __name__ == "__main__":
    main()
