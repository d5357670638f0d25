"""`longbow` command line. Subcommands grow with the gateway (serve, ingest, query, context).

Logs are structured (key=value) and quiet by default (warnings only); `-v` shows info.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time

from services.config import load_config


def _configure_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="ts=%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)r")


def cmd_info(args) -> int:
    """Resolve (and on first use convert) the model, print what would be served."""
    from services.engine.weights import load_model

    config = load_config(args.config)
    loaded = load_model(config.model)
    print(json.dumps({"checkpoint": str(loaded.checkpoint), "device": str(loaded.device),
                      "dtype": str(loaded.dtype), "model": loaded.args.__dict__}, indent=2, default=str))
    return 0


def cmd_generate(args) -> int:
    """Generate from a prompt on the embedded engine, streaming text to stdout."""
    from services.engine.engine import AsyncLLMEngine, LLMEngine
    from services.engine.text import encode_chat, stream_text
    from services.engine.types import Request, SamplingParams
    from services.engine.weights import load_tokenizer

    config = load_config(args.config)
    engine = LLMEngine(config)
    tokenizer = load_tokenizer(engine.loaded.checkpoint)
    ids = encode_chat(tokenizer, [{"role": "user", "content": args.prompt}]) if args.chat else tokenizer(args.prompt).input_ids
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    async_engine = AsyncLLMEngine(engine)

    async def run() -> None:
        start, n = time.perf_counter(), 0
        async for delta in stream_text(async_engine, tokenizer, Request("cli", ids, params), args.stop or []):
            sys.stdout.write(delta.text)
            sys.stdout.flush()
            n += delta.event.token_id is not None
        elapsed = time.perf_counter() - start
        print(f"\n[{n} tokens in {elapsed:.2f} s, {n / elapsed:.1f} tok/s]", file=sys.stderr)

    try:
        asyncio.run(run())
    finally:
        async_engine.shutdown()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longbow", description="Long-context LLM serving.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    parser.add_argument("--config", help="TOML config file (also LONGBOW_CONFIG); env LONGBOW_* overrides it")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="resolve the model (converting the bundled one on first use) and print it")
    info.set_defaults(fn=cmd_info)
    gen = sub.add_parser("generate", help="generate text from a prompt on the embedded engine")
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.set_defaults(fn=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    from services.engine.errors import EngineError

    try:
        return args.fn(args)
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
