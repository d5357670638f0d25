"""Latency an editor feels: `longbow lsp` driven like an editor, over stdio JSON-RPC, against a real gateway.

    python bench/lsp.py            # 16 typed characters, 3 warm-up, plus the Complete column (~10 minutes)
    python bench/lsp.py --quick    # 8 typed characters, 2 warm-up (~2-3 minutes on 2 CPU cores)

Protocol: a gateway runs in this process (its own event-loop thread, the real bundled model, the engine
config `longbow serve` uses). `longbow lsp` processes are started as an editor starts them (a subprocess on
stdio, pytest-lsp's client with the VS Code capability profile), rooted at this repository, so the
workspace upload and the typed-hole context see a real project. The document is an unsaved buffer of a real
file of this repo (services/engine/weights.py, ~2k tokens) with a typed hole appended:

    def reload_model(source: ModelSource) -> LoadedModel:
        return <cursor>

Then `load_model(source)` is typed one character at a time (didChange). After each character, at the cursor:
  hover            textDocument/hover (LSP + gRPC GetContext + code context), end to end
  context          longbow/context (the whole CodeContext), end to end
  inline/session   textDocument/inlineCompletion on a server with `--inline session`: the document's PIE
                   session gets the edit (ApplyEdits) and predicts from its kept KV
  inline/reencode  the same request on a second server whose editor closes and reopens the document at every
                   step (didClose + didOpen): a fresh session encodes the whole file each time, timed from
                   didOpen to the answer. Same prompt, same prediction code: the difference is the kept KV.
  inline/complete  (unless --no-complete) a third server with `--inline complete`: Complete at the typed hole
                   with a packed context, re-encoded per request (error rounds 0); not the same prompt as the
                   two above, shown for what an editor without sessions would use at a hole.
All requests are sequential (one in flight), so the timings do not contend for the two CPU cores.
The first --warmup characters are excluded from the statistics (warm numbers).

Prints a table, writes bench/results/lsp.json, progress on stderr.
Targets (issue 15): hover/context p95 <= 150 ms warm; completion with the session >= 3x faster than
without (re-encoding) at a 2k-token file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILE = "services/engine/weights.py"
HOLE_FUNCTION = "\n\ndef reload_model(source: ModelSource) -> LoadedModel:\n    return "
TYPED = "load_model(source)"


def log(message: str) -> None:
    print(f"[lsp bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class InProcessGateway:
    """A real gateway on 127.0.0.1 (free port) on its own event-loop thread: tests/conftest.py's
    RunningGateway, with the engine config `longbow serve` uses by default on this machine."""

    def __init__(self):
        from longbow.services.config import GatewayConfig, LongbowConfig, ModelSource, RagConfig
        from longbow.services.engine.engine import AsyncLLMEngine
        from longbow.services.engine.weights import load_model, load_tokenizer
        from longbow.services.gateway.server import start_gateway
        from longbow.services.replica import build_engine

        model = load_model(ModelSource(device="cpu", dtype="float32"))
        self._data_dir = tempfile.TemporaryDirectory(prefix="longbow-bench-lsp-")
        self.config = LongbowConfig(gateway=GatewayConfig(port=0, metrics_port=0),
                                    rag=RagConfig(data_dir=self._data_dir.name))
        self.engine = AsyncLLMEngine(build_engine(self.config, model))
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.tokenizer = load_tokenizer(model.checkpoint)
        self.gateway = self.run(start_gateway(self.config, self.engine, self.tokenizer))
        self.address = f"127.0.0.1:{self.gateway.port}"

    def run(self, coroutine, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def kv_blocks_used(self) -> int:
        return self.run(self.engine.call(lambda e: e.stats()))["kv_blocks_used"]

    def close(self) -> None:
        self.run(self.gateway.stop(0.5))
        self.engine.shutdown()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self._data_dir.cleanup()


class Editor:
    """One `longbow lsp` process and its client, rooted at this repository, holding one document."""

    def __init__(self, client, uri: str):
        self.client, self.uri, self.version = client, uri, 0

    @classmethod
    async def start(cls, address: str, inline: str, max_tokens: int) -> "Editor":
        from lsprotocol import types
        from pytest_lsp import ClientServerConfig, client_capabilities

        command = [sys.executable, "-m", "longbow.services.cli", "lsp", "--address", address, "--inline", inline,
                   "--max-tokens", str(max_tokens), "--error-rounds", "0"]
        client = await ClientServerConfig(server_command=command).start()
        await client.initialize_session(types.InitializeParams(
            capabilities=client_capabilities("visual-studio-code"), root_uri=ROOT.as_uri(),
            workspace_folders=[types.WorkspaceFolder(uri=ROOT.as_uri(), name="longbow")]))
        return cls(client, (ROOT / FILE).as_uri())

    def open(self, text: str) -> None:
        from lsprotocol import types

        self.version += 1
        self.client.text_document_did_open(types.DidOpenTextDocumentParams(text_document=types.TextDocumentItem(
            uri=self.uri, language_id="python", version=self.version, text=text)))

    def close(self) -> None:
        from lsprotocol import types

        self.client.text_document_did_close(types.DidCloseTextDocumentParams(
            text_document=types.TextDocumentIdentifier(uri=self.uri)))

    def insert(self, line: int, character: int, text: str) -> None:
        from lsprotocol import types

        self.version += 1
        here = types.Position(line=line, character=character)
        self.client.text_document_did_change(types.DidChangeTextDocumentParams(
            text_document=types.VersionedTextDocumentIdentifier(uri=self.uri, version=self.version),
            content_changes=[types.TextDocumentContentChangePartial(range=types.Range(start=here, end=here),
                                                                    text=text)]))

    def _at(self, line: int, character: int) -> dict:
        from lsprotocol import types

        return {"text_document": types.TextDocumentIdentifier(uri=self.uri),
                "position": types.Position(line=line, character=character)}

    async def hover(self, line: int, character: int) -> str | None:
        from lsprotocol import types

        found = await self.client.text_document_hover_async(types.HoverParams(**self._at(line, character)))
        return found.contents.value if found else None

    async def context(self, line: int, character: int):
        return await self.client.protocol.send_request_async("longbow/context", {
            "textDocument": {"uri": self.uri}, "position": {"line": line, "character": character}})

    async def inline(self, line: int, character: int) -> str | None:
        from lsprotocol import types

        found = await self.client.text_document_inline_completion_async(types.InlineCompletionParams(
            **self._at(line, character),
            context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Invoked)))
        return found.items[0].insert_text if found and found.items else None

    async def session_tokens(self) -> int | None:
        state = await self.client.protocol.send_request_async("longbow/documentState", {"textDocument": {"uri": self.uri}})
        return state.get("sessionTokens") if isinstance(state, dict) else getattr(state, "sessionTokens", None)

    async def stop(self) -> None:
        await self.client.shutdown_session()
        await self.client.stop()


async def timed(coroutine) -> tuple[float, object]:
    start = time.perf_counter()
    result = await coroutine
    return (time.perf_counter() - start) * 1000.0, result


async def type_and_measure(address: str, steps: int, warmup: int, max_tokens: int, with_complete: bool) -> dict:
    """Types TYPED[:warmup + steps] at the hole; per character: hover, context and the inline fills."""
    base = (ROOT / FILE).read_text() + HOLE_FUNCTION
    line = base.count("\n")
    column0 = len(base) - base.rfind("\n") - 1  # ASCII: code points == UTF-16 units
    modes = ["session", "reencode"] + (["complete"] if with_complete else [])
    log(f"starting {len(modes)} `longbow lsp` processes: {', '.join(modes)}")
    editors = {"session": await Editor.start(address, "session", max_tokens),
               "reencode": await Editor.start(address, "session", max_tokens)}
    if with_complete:
        editors["complete"] = await Editor.start(address, "complete", max_tokens)
    for editor in editors.values():
        editor.open(base)
    samples: dict[str, list[float]] = {"hover": [], "context": [], **{f"inline_{m}": [] for m in modes}}
    hovers_answered, fills, text = 0, {}, base
    # NOTE: step 0 (before any character) warms every path: the workspace upload, the first session open,
    # the code-context index; it is not a keystroke and is never counted.
    for step in range(warmup + steps + 1):
        if step > 0:
            char = TYPED[(step - 1) % len(TYPED)]
            for name, editor in editors.items():
                if name != "reencode":
                    editor.insert(line, column0 + step - 1, char)
            text += char
        column = column0 + step
        session = editors["session"]
        hover_ms, hover = await timed(session.hover(line, column))
        context_ms, _ = await timed(session.context(line, column))
        inline_ms = {}
        inline_ms["session"], fills["session"] = await timed(session.inline(line, column))
        reencode = editors["reencode"]
        start = time.perf_counter()
        if step > 0:
            reencode.close()
            reencode.open(text)
        fills["reencode"] = await reencode.inline(line, column)
        inline_ms["reencode"] = (time.perf_counter() - start) * 1000.0
        if with_complete:
            inline_ms["complete"], fills["complete"] = await timed(editors["complete"].inline(line, column))
        counted = step > warmup
        if counted:
            samples["hover"].append(hover_ms)
            samples["context"].append(context_ms)
            for mode in modes:
                samples[f"inline_{mode}"].append(inline_ms[mode])
            hovers_answered += hover is not None
        log(f"step {step:2d}{'' if counted else ' (warm-up)'} typed={text[len(base):]!r:22} hover={hover_ms:7.1f} ms "
            f"context={context_ms:7.1f} ms " + " ".join(f"inline/{m}={inline_ms[m]:7.1f} ms" for m in modes))
    tokens = await editors["session"].session_tokens()
    for editor in editors.values():
        await editor.stop()
    return {"samples": samples, "modes": modes, "hovers_answered": hovers_answered, "session_tokens": tokens,
            "last_fills": fills, "last_hover": hover}


def summarise(samples: dict[str, list[float]]) -> dict:
    return {name: {"p50_ms": statistics.median(values), "p95_ms": percentile(values, 0.95),
                   "mean_ms": statistics.fmean(values), "n": len(values)} for name, values in samples.items() if values}


def print_table(summary: dict, result: dict, args) -> None:
    print(f"\nEditor latency: `longbow lsp` over stdio -> gRPC gateway (in-process) -> model; {FILE} + a typed hole, "
          f"{result['session_tokens']} session tokens; {summary['hover']['n']} typed characters after "
          f"{args.warmup} warm-up; inline --max-tokens {args.max_tokens}")
    print(f"{'request':<34}{'p50 ms':>10}{'p95 ms':>10}{'mean ms':>10}")
    labels = {"hover": "hover (GetContext)", "context": "longbow/context",
              "inline_session": "inline, edit session (kept KV)", "inline_reencode": "inline, re-encode (reopen)",
              "inline_complete": "inline, Complete at hole"}
    for name, row in summary.items():
        print(f"{labels[name]:<34}{row['p50_ms']:>10.1f}{row['p95_ms']:>10.1f}{row['mean_ms']:>10.1f}")
    speedup = summary["inline_reencode"]["p50_ms"] / summary["inline_session"]["p50_ms"]
    worst = max(summary["hover"]["p95_ms"], summary["context"]["p95_ms"])
    print(f"\nsession speedup (re-encode p50 / session p50): {speedup:.2f}x   target >= 3x: "
          f"{'met' if speedup >= 3 else 'MISSED'}")
    print(f"hover/context p95: {worst:.1f} ms   target <= 150 ms: {'met' if worst <= 150 else 'MISSED'}")
    print(f"hovers that showed a type: {result['hovers_answered']}/{summary['hover']['n']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 characters, 2 warm-up, no Complete column")
    parser.add_argument("--steps", type=int, default=16, help="typed characters that are measured")
    parser.add_argument("--warmup", type=int, default=3, help="typed characters before measuring")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens of an inline fill (all modes)")
    parser.add_argument("--no-complete", action="store_true", help="skip the `--inline complete` column")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "lsp.json"))
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.no_complete = 8, 2, True
    log("loading the model and starting the gateway")
    gateway = InProcessGateway()
    try:
        started = time.perf_counter()
        result = asyncio.run(type_and_measure(gateway.address, args.steps, args.warmup, args.max_tokens,
                                              not args.no_complete))
        log(f"typed in {time.perf_counter() - started:.0f} s")
        time.sleep(1.0)  # closes travel to the engine thread asynchronously
        kv_left = gateway.kv_blocks_used()
    finally:
        gateway.close()
    summary = summarise(result["samples"])
    print_table(summary, result, args)
    speedup = summary["inline_reencode"]["p50_ms"] / summary["inline_session"]["p50_ms"]
    report = {
        "bench": "lsp", "command": " ".join(["python", "bench/lsp.py", *sys.argv[1:]]),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "python": platform.python_version()},
        "file": FILE, "typed": TYPED, "session_tokens": result["session_tokens"], "steps": args.steps,
        "warmup": args.warmup, "max_tokens": args.max_tokens, "summary": summary,
        "session_speedup_p50": speedup, "hovers_answered": result["hovers_answered"],
        "targets": {"hover_context_p95_le_150ms": max(summary["hover"]["p95_ms"], summary["context"]["p95_ms"]) <= 150,
                    "session_speedup_ge_3x": speedup >= 3},
        "kv_blocks_left_after_editors_quit": kv_left, "last_fills": result["last_fills"],
        "samples_ms": result["samples"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
