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
from pathlib import Path

from longbow.services.config import load_config


def _configure_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="ts=%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)r")
    logging.getLogger("bm25s").setLevel(max(level, logging.WARNING))  # it sets itself to DEBUG


def cmd_info(args) -> int:
    """Resolve (and on first use convert) the model, print what would be served."""
    from longbow.services.engine.weights import load_model

    config = load_config(args.config)
    loaded = load_model(config.model)
    print(json.dumps({"checkpoint": str(loaded.checkpoint), "device": str(loaded.device),
                      "dtype": str(loaded.dtype), "model": loaded.args.__dict__}, indent=2, default=str))
    return 0


def cmd_serve(args) -> int:
    """Run the gRPC gateway with the embedded engine until SIGINT/SIGTERM."""
    from longbow.services.gateway.server import serve

    overrides = {f"gateway__{k}": v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if args.shards is not None:
        overrides["engine__shards"] = args.shards
    if args.address is not None:
        overrides["engine__ray_address"] = args.address
    if args.no_metrics:
        overrides["gateway__metrics_port"] = None
    from longbow.rag.store import NotDurableError

    try:
        asyncio.run(serve(load_config(args.config, **overrides)))
    except NotDurableError as exc:  # a configuration to fix, not a crash: the message names the fix
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_generate(args) -> int:
    """Generate from a prompt, streaming text to stdout: through a server (--address) or embedded."""
    if args.address:
        return _generate_remote(args)
    return _generate_embedded(args)


def _generate_remote(args) -> int:
    from longbow.services.client.sdk import LongbowClient, LongbowError

    prompt = {"messages": [{"role": "user", "content": args.prompt}]} if args.chat else {"prompt": args.prompt}
    try:
        with LongbowClient(args.address, token=args.token or "") as client:
            for chunk in client.generate_stream(**prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                                                top_p=args.top_p, seed=args.seed, stop=args.stop or []):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
    except LongbowError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 2
    print()
    return 0


def _generate_embedded(args) -> int:
    from longbow.services.engine.engine import AsyncLLMEngine
    from longbow.services.replica import build_engine
    from longbow.services.text.text import encode_chat, stream_text
    from longbow.services.engine.types import Request, SamplingParams
    from longbow.services.engine.weights import load_tokenizer

    config = load_config(args.config)
    engine = build_engine(config)
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


def _rag_location(config) -> tuple[str, str]:
    from longbow.services.config import longbow_home

    return config.rag.store_url, config.rag.data_dir or str(longbow_home() / "rag")


def _embedded_lm(config):
    from longbow.services.text.lm import EngineLM

    return EngineLM.from_config(config)


def _scoring_lm(config):
    """The ingest chunkers only score text: their engine runs in rag.scoring_dtype (bf16 where native)."""
    from longbow.services.text.lm import EngineLM

    return EngineLM.for_scoring(config)


def _show_progress(progress) -> None:
    print(f"\ringest: {progress.documents_done}/{progress.documents_total} documents, "
          f"{progress.chunks_written} chunks, {progress.documents_unchanged} unchanged", end="", file=sys.stderr, flush=True)


def cmd_ingest(args) -> int:
    """Chunk, embed and store files (directories: their .txt/.md/.rst files), with progress."""
    from longbow.rag.ingest import ingest_paths, read_documents

    config = load_config(args.config)
    chunker = args.chunker or config.rag.default_chunker
    target = args.target_tokens or config.rag.target_chunk_tokens
    try:
        if args.address:
            from longbow.services.client.sdk import LongbowClient

            with LongbowClient(args.address, token=args.token or "") as client:
                progress = client.ingest(read_documents(args.paths), chunker=chunker, target_chunk_tokens=target,
                                         on_progress=_show_progress)
        else:
            store_url, data_dir = _rag_location(config)
            from longbow.services.text.lm import load_token_spans

            lm = _scoring_lm(config) if chunker in ("perplexity", "margin") else None
            # Chunk lengths in model tokens for every chunker, as the gateway counts them.
            progress = ingest_paths(args.paths, store_url=store_url, data_dir=data_dir, chunker=chunker,
                                    target_tokens=target, lm=lm, on_progress=_show_progress,
                                    token_spans=load_token_spans(config))
    except (ValueError, OSError) as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 2
    print(file=sys.stderr)
    return 0


def cmd_query(args) -> int:
    """Retrieve for a query: documents with their best chunks (default) or chunks (--chunks), to stdout
    (--json for machines); with --answer, generate an answer from them first."""
    config = load_config(args.config)
    try:
        if args.address:
            answer, documents = _query_remote(args)
        else:
            answer, documents = _query_embedded(args, config)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _print_results(args, answer, documents)
    return 0


def _query_embedded(args, config) -> tuple[str | None, list[dict]]:
    """Retrieval-only queries embed with the numpy MiniLM (no torch import: ~1 s instead of ~7 s)."""
    from longbow.rag.minilm import shared_numpy_embedder
    from longbow.rag.retrieve import open_retriever

    store_url, data_dir = _rag_location(config)
    if args.store_dir:
        if not Path(args.store_dir).is_dir():
            raise ValueError(f"--store-dir {args.store_dir}: no such directory (ingest creates it)")
        store_url, data_dir = "", args.store_dir
    retriever = open_retriever(store_url, data_dir, embedder=shared_numpy_embedder(),
                               dense_kind=config.rag.dense_index, candidates=config.rag.candidates)
    try:
        if args.answer:
            from longbow.rag.flows import run_flow

            result = run_flow(args.flow, args.query, retriever, _embedded_lm(config), top_k=args.top_k,
                              on_text=None if args.json else lambda text: print(text, end="", flush=True))
            if not args.json:
                print()
            return result.answer, _group_citations([_hit_row(h) for h in result.hits], not args.chunks)
        if args.chunks:
            hits = retriever.retrieve(args.query, args.top_k)
            return None, _group_citations([_hit_row(h) for h in hits], False)
        documents = retriever.retrieve_documents(args.query, args.top_k, expand_to_chars=args.expand_chars)
        return None, [{"document_id": d.document_id, "score": d.score,
                       "citations": [_hit_row(h) for h in d.hits]} for d in documents]
    finally:
        retriever.store.close()


def _query_remote(args) -> tuple[str | None, list[dict]]:
    from longbow.rag.retrieve import CHUNKS_PER_DOCUMENT
    from longbow.services.client.sdk import LongbowClient, LongbowError

    try:
        with LongbowClient(args.address, token=args.token or "") as client:
            result = client.query(args.query, top_k=args.top_k, answer=args.answer,
                                  flow=args.flow if args.answer else "",
                                  grouping="chunks" if args.chunks else "documents",
                                  chunks_per_document=CHUNKS_PER_DOCUMENT)
    except LongbowError as exc:
        raise ValueError(str(exc)) from None
    rows = [{"document_id": c.document_id, "chunk_id": c.chunk_id, "char_start": c.char_start,
             "char_end": c.char_end, "score": c.score, "text": c.text, "metadata": dict(c.metadata)}
            for c in result.citations]
    return (result.answer if args.answer else None), _group_citations(rows, not args.chunks)


def _hit_row(hit) -> dict:
    c = hit.chunk
    return {"document_id": c.document_id, "chunk_id": c.chunk_id, "char_start": c.char_start,
            "char_end": c.char_end, "score": hit.score, "text": c.text, "metadata": dict(c.metadata)}


def _group_citations(rows: list[dict], grouped: bool) -> list[dict]:
    """Citations (best first) as documents in order of their best citation; ungrouped: one per citation."""
    documents: dict = {}
    for index, row in enumerate(rows):
        key = row["document_id"] if grouped else index
        documents.setdefault(key, {"document_id": row["document_id"], "score": row["score"], "citations": []})
        documents[key]["citations"].append(row)
    return list(documents.values())


def _print_results(args, answer: str | None, documents: list[dict]) -> None:
    if args.json:
        payload = {"query": args.query, "documents": documents} if not args.chunks else \
            {"query": args.query, "citations": [c for d in documents for c in d["citations"]]}
        if answer is not None:
            payload["answer"] = answer
        print(json.dumps(payload, indent=2, ensure_ascii=False))
        return
    if answer is not None and args.address:
        print(answer)
    for rank, document in enumerate(documents, 1):
        citations = document["citations"]
        if args.chunks:
            c = citations[0]
            print(f"[{rank}] {c['document_id']}:{c['char_start']}-{c['char_end']} score={c['score']:.4f}  "
                  f"{' '.join(c['text'].split())[:100]}")
            continue
        print(f"[{rank}] {document['document_id']} score={document['score']:.4f}")
        for c in citations:
            snippet = " ".join(c["text"].split())[:100]
            print(f"    {c['char_start']}-{c['char_end']} {c['score']:.4f}  {snippet}")


def cmd_context(args) -> int:
    """Typed-hole context for FILE:LINE:COL: expected type, relevant types and headers, packed."""
    import os

    file, line, column = _location(args.location)
    root = os.path.abspath(args.root or os.getcwd())
    path = os.path.relpath(os.path.abspath(file), root)
    if args.address:
        from longbow.services.client.sdk import LongbowClient, LongbowError
        from pathlib import Path

        from longbow.services.lsp.workspace_files import import_closure, read_file_under

        # The server reads no disk by default (and may be another machine): the request carries the
        # file and what it imports, as the editor plugin's detached mode does.
        files = import_closure(path, lambda rel: read_file_under(Path(root), rel))
        if path not in files:
            print(f"error: cannot read {file} under {root}", file=sys.stderr)
            return 2
        try:
            with LongbowClient(args.address, token=args.token or "") as client:
                context = client.code_context("", path, line, column, open_files=files,
                                              token_budget=args.budget)
        except LongbowError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        expected, packed, tokens = context.expected_type.text, context.packed_context, context.packed_tokens
    else:
        from longbow.rag.codectx import build_context
        from longbow.rag.codectx.errors import CodeContextError

        try:
            context = build_context(root, path, line, column, args.budget)
        except CodeContextError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        expected, packed, tokens = context.expected_type.text, context.packed_text, context.packed_tokens
    print(f"# expected type: {expected or '(unknown)'} ({tokens} tokens of context)", file=sys.stderr)
    print(packed)
    return 0


def _location(location: str) -> tuple[str, int, int]:
    try:
        file, line, column = location.rsplit(":", 2)
        return file, int(line), int(column)
    except ValueError:
        raise SystemExit(f"error: expected FILE:LINE:COL (1-based), got {location!r}") from None


def cmd_lsp(args) -> int:
    """Language server on stdio for editors, over a running gateway (SDK only: no torch)."""
    from longbow.services.lsp.cli import run

    return run(args, load_config(args.config))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longbow", description="Long-context LLM serving.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    parser.add_argument("--config", help="TOML config file (also LONGBOW_CONFIG); env LONGBOW_* overrides it")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="resolve the model (converting the bundled one on first use) and print it")
    info.set_defaults(fn=cmd_info)
    serve = sub.add_parser("serve", help="serve the gRPC API (embedded engine; LONGBOW_* env configures it)")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="gRPC port (default 50051)")
    serve.add_argument("--no-metrics", action="store_true", help="do not serve Prometheus metrics (default port 9464)")
    serve.add_argument("--shards", type=int, help="Ray actors splitting each sequence (0: in-process engine, the default)")
    serve.add_argument("--address", help="join this Ray cluster (e.g. auto) instead of starting a local one")
    serve.set_defaults(fn=cmd_serve)
    gen = sub.add_parser("generate", help="generate text from a prompt (embedded engine, or a server with --address)")
    gen.add_argument("prompt")
    gen.add_argument("--address", help="host:port of a running `longbow serve`; omitted: run the model in-process")
    gen.add_argument("--token", help="bearer token for a server with auth")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.set_defaults(fn=cmd_generate)
    ingest = sub.add_parser("ingest", help="chunk, embed and store files for retrieval (embedded store, or --address)")
    ingest.add_argument("paths", nargs="+", help="files or directories (.txt .md .rst)")
    ingest.add_argument("--chunker", choices=["fixed", "sentence", "perplexity", "margin"],
                        help="default: rag.default_chunker (perplexity)")
    ingest.add_argument("--target-tokens", type=int, default=0, help="target chunk length (default from config)")
    ingest.add_argument("--address", help="host:port of a running `longbow serve`")
    ingest.add_argument("--token", help="bearer token for a server with auth")
    ingest.set_defaults(fn=cmd_ingest)
    query = sub.add_parser("query", help="retrieve documents (with their best chunks) for a query; "
                                          "--answer generates an answer from them")
    query.add_argument("query")
    query.add_argument("--top-k", type=int, default=5, help="documents (chunks with --chunks) to return")
    query.add_argument("--chunks", action="store_true", help="chunks best first, not grouped by document")
    query.add_argument("--json", action="store_true", help="results as one JSON object on stdout")
    query.add_argument("--expand-chars", type=int, default=0,
                       help="cite a shorter chunk with its neighbours, within its section, up to this many "
                            "characters (embedded store only)")
    query.add_argument("--store-dir", help="embedded store directory (default: rag.data_dir of the config)")
    query.add_argument("--answer", action="store_true", help="generate an answer (streamed) with --flow")
    query.add_argument("--flow", default="single", choices=["none", "single", "fixed_interval", "flare", "dragin"])
    query.add_argument("--address", help="host:port of a running `longbow serve`")
    query.add_argument("--token", help="bearer token for a server with auth")
    query.set_defaults(fn=cmd_query)
    ctx = sub.add_parser("context", help="typed-hole code context for FILE:LINE:COL (embedded, or a server with --address)")
    ctx.add_argument("location", help="FILE:LINE:COL, 1-based")
    ctx.add_argument("--root", help="workspace root (default: the current directory); nothing outside it is read")
    ctx.add_argument("--budget", type=int, default=1024, help="token budget of the packed context")
    ctx.add_argument("--address", help="host:port of a running `longbow serve`")
    ctx.add_argument("--token", help="bearer token for a server with auth")
    ctx.set_defaults(fn=cmd_context)
    lsp = sub.add_parser("lsp", help="language server (stdio) for editors, over a running `longbow serve`")
    lsp.add_argument("--address", help="host:port of the gateway (default: gateway.host:gateway.port of the config)")
    lsp.add_argument("--token", help="bearer token (default: gateway.auth_token, LONGBOW_AUTH_TOKEN)")
    lsp.add_argument("--tls", action="store_true", help="TLS to the gateway (CA: --tls-ca, else the system's)")
    lsp.add_argument("--tls-ca", help="PEM file of the CA that signed the gateway's certificate")
    lsp.add_argument("--max-tokens", type=int, default=32, help="tokens of an inline fill")
    lsp.add_argument("--error-rounds", type=int, default=1, choices=[0, 1, 2], help="type-check rounds of a fill")
    lsp.add_argument("--inline", default="auto", choices=["auto", "complete", "session"],
                     help="inline fills: Complete at typed holes and the edit session elsewhere (auto), or one of them")
    lsp.set_defaults(fn=cmd_lsp)
    bench = sub.add_parser("bench", help="run a benchmark from bench/ (source checkout), e.g. `longbow bench engine --quick`")
    bench.add_argument("name", help="engine, ringattn, gateway, ...")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    bench.set_defaults(fn=cmd_bench)
    return parser


def cmd_bench(args) -> int:
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "bench" / f"{args.name}.py"
    if not script.is_file():
        print(f"error: no benchmark {script}", file=sys.stderr)
        return 2
    sys.argv = [str(script), *args.bench_args]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    from longbow.services.engine.errors import EngineError

    try:
        return args.fn(args)
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
