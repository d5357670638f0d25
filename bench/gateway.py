"""Gateway overhead: the same streaming workload in-process (AsyncLLMEngine + text layer) and through
the gRPC gateway over a loopback socket (AsyncLongbowClient), at 1 and 16 concurrent streams.

    python bench/gateway.py [--concurrency 1 16] [--requests-per-client 3] [--prompt-tokens 128] [--output-tokens 32]

Reports throughput (generated tokens/s) and TTFT p50/p95 for both paths and their ratios, prints a
table and writes bench/results/gateway.json. Both paths share one engine config and one process (the
server runs on its own event-loop thread), so the ratio isolates gRPC, protobuf and handler costs.
Targets: < 5% throughput loss, < 2 ms added TTFT p50.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from longbow.services.client.sdk import AsyncLongbowClient
from longbow.services.config import EngineConfig, GatewayConfig, LongbowConfig, ModelSource
from longbow.services.engine.engine import AsyncLLMEngine, LLMEngine
from longbow.services.text.text import stream_text
from longbow.services.engine.types import Request, SamplingParams
from longbow.services.engine.weights import load_model, load_tokenizer

TEXT = ("Sequence parallelism splits one long request across several devices so that its attention "
        "fits in memory; the scheduler keeps every forward pass at a fixed token budget. ") * 40


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def one_in_process(engine, tokenizer, ids, n_out, rid) -> tuple[float, int]:
    start, ttft, count = time.perf_counter(), None, 0
    params = SamplingParams(max_tokens=n_out, min_tokens=n_out)
    async with contextlib.aclosing(stream_text(engine, tokenizer, Request(rid, ids, params))) as deltas:
        async for delta in deltas:
            if delta.event.token_id is not None:
                count += 1
                ttft = ttft if ttft is not None else time.perf_counter() - start
    return ttft, count


async def one_through_gateway(client, ids, n_out, rid) -> tuple[float, int]:
    start, ttft, count = time.perf_counter(), None, 0
    async for chunk in client.generate_stream(token_ids=ids, max_tokens=n_out, min_tokens=n_out, request_id=rid):
        count += len(chunk.token_ids)
        if chunk.token_ids and ttft is None:
            ttft = time.perf_counter() - start
    return ttft, count


async def closed_loop(call, concurrency: int, per_client: int, ids, n_out, tag: str) -> dict:
    async def client_loop(c: int):
        return [await call(ids, n_out, f"{tag}-{c}-{i}") for i in range(per_client)]

    start = time.perf_counter()
    results = [r for rs in await asyncio.gather(*(client_loop(c) for c in range(concurrency))) for r in rs]
    elapsed = time.perf_counter() - start
    ttfts = [r[0] for r in results]
    return {"tokens_per_s": sum(r[1] for r in results) / elapsed, "ttft_p50_ms": 1e3 * statistics.median(ttfts),
            "ttft_p95_ms": 1e3 * percentile(ttfts, 0.95), "requests": len(results)}


def start_gateway_thread(config, engine, tokenizer):
    from longbow.services.gateway.server import start_gateway

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    gateway = asyncio.run_coroutine_threadsafe(start_gateway(config, engine, tokenizer), loop).result(120)
    return loop, gateway


async def run(args) -> list[dict]:
    loaded = load_model(ModelSource(device="cpu", dtype="float32"))
    tokenizer = load_tokenizer(loaded.checkpoint)
    ids = tokenizer(TEXT).input_ids[: args.prompt_tokens]
    config = LongbowConfig(engine=EngineConfig(token_budget=512, num_blocks=2048),
                           gateway=GatewayConfig(port=0, metrics_port=None, max_inflight=256))
    engine = AsyncLLMEngine(LLMEngine(config, loaded))
    _, gateway = start_gateway_thread(config, engine, tokenizer)
    client = AsyncLongbowClient(f"127.0.0.1:{gateway.port}", timeout_s=600)
    in_process = lambda i, n, rid: one_in_process(engine, tokenizer, i, n, rid)  # noqa: E731
    through = lambda i, n, rid: one_through_gateway(client, i, n, rid)  # noqa: E731
    await closed_loop(in_process, 2, 1, ids, 4, "warm")  # warm both paths
    await closed_loop(through, 2, 1, ids, 4, "warmgw")
    rows = []
    for concurrency in args.concurrency:
        for repeat in range(args.repeats):  # alternate to spread machine noise over both paths
            local = await closed_loop(in_process, concurrency, args.requests_per_client, ids, args.output_tokens, f"l{repeat}")
            remote = await closed_loop(through, concurrency, args.requests_per_client, ids, args.output_tokens, f"g{repeat}")
            rows.append({"concurrency": concurrency, "repeat": repeat, "in_process": local, "gateway": remote,
                         "throughput_ratio": remote["tokens_per_s"] / local["tokens_per_s"],
                         "added_ttft_p50_ms": remote["ttft_p50_ms"] - local["ttft_p50_ms"]})
            print(f"[gateway bench] concurrency={concurrency} repeat={repeat} done", file=sys.stderr, flush=True)
    await client.close()
    engine.shutdown()
    return rows


def print_table(rows: list[dict]) -> None:
    header = f"{'streams':>7} {'rep':>3} | {'in-proc tok/s':>13} {'gw tok/s':>9} {'gw/in':>6} | " \
             f"{'in TTFT p50':>11} {'gw TTFT p50':>11} {'added ms':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        a, b = r["in_process"], r["gateway"]
        print(f"{r['concurrency']:>7} {r['repeat']:>3} | {a['tokens_per_s']:>13.1f} {b['tokens_per_s']:>9.1f} "
              f"{r['throughput_ratio']:>6.3f} | {a['ttft_p50_ms']:>11.1f} {b['ttft_p50_ms']:>11.1f} "
              f"{r['added_ttft_p50_ms']:>8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--requests-per-client", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gateway.json"))
    args = parser.parse_args()
    rows = asyncio.run(run(args))
    print_table(rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
