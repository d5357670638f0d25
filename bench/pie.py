"""PIE vs full recompute vs conflict fast encoding on real code: next-line exact match and KV-update time.

Protocol (after the PIE paper's code-editing setup): take a Python standard-library file (code nobody
here wrote), cut it before a non-empty target line so the context is ~N tokens; make a *pre-edit*
version of the context by one random edit (a line deleted -> the edit re-inserts it; a foreign line
inserted -> the edit deletes it; a line replaced -> the edit restores it). Encode the pre-edit text once,
fork its KV for every update mode, apply the edit in each (timed), then predict the next line greedily
at the end of the context and compare it with the file's real next line (exact match after stripping).
FULL re-encodes the document (exact); SUFFIX re-encodes from the edit on (exact); PIE re-positions;
CONFLICT encodes the new tokens only. All modes run through the same SessionManager code path.

    python bench/pie.py                       # defaults: 30 samples at 2k tokens, timing at 4k
    python bench/pie.py --samples 8 --context-tokens 1024 --timing-samples 2   # quick
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MODES = ["full", "suffix", "pie", "conflict"]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def stdlib_files(tokenizer, min_tokens: int) -> list[tuple[Path, list[str]]]:
    """Standard-library modules (sorted, so the choice is reproducible) long enough for the context."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if len(text) < min_tokens * 3:  # ~3+ characters per token in code: cheap pre-filter
            continue
        files.append((path, text.splitlines(keepends=True)))
    return files


def cut_context(tokenizer, lines: list[str], target_tokens: int, rng: random.Random):
    """(context lines, next line) with the context as close to target_tokens as whole lines allow."""
    counts = [len(tokenizer(line, add_special_tokens=False).input_ids) for line in lines]
    start = rng.randrange(0, max(1, len(lines) // 4))
    total, end = 0, start
    while end < len(lines) and total + counts[end] <= target_tokens:
        total += counts[end]
        end += 1
    while end < len(lines) and not lines[end].strip():  # the target must be a real line
        end += 1
    if end >= len(lines) or total < target_tokens * 0.8:
        return None
    return lines[start:end], lines[end]


def make_edit(context: list[str], kind: str, donor_lines: list[str], rng: random.Random):
    """(pre-edit text, (start, end, replacement)) such that applying the edit gives the real context."""
    real = "".join(context)
    k = rng.randrange(1, len(context) - 1)
    offset = sum(len(line) for line in context[:k])
    if kind == "insert":  # the pre-edit text lacks line k; the edit puts it back
        pre = real[:offset] + real[offset + len(context[k]):]
        return pre, (offset, offset, context[k])
    foreign = rng.choice([line for line in donor_lines if line.strip()] or ["pass\n"])
    if kind == "delete":  # the pre-edit text has a foreign line at k; the edit removes it
        pre = real[:offset] + foreign + real[offset:]
        return pre, (offset, offset + len(foreign), "")
    pre = real[:offset] + foreign + real[offset + len(context[k]):]  # replace: restore line k
    return pre, (offset, offset + len(foreign), context[k])


def run_sample(manager, pre: str, edit, real: str, modes: list[str]) -> dict:
    from longbow.services.engine.pie import UpdateMode
    from longbow.services.text.sessions import TextEdit

    base = manager.open(pre, mode=UpdateMode.FULL)
    results = {}
    try:
        for mode in modes:
            session = manager.fork(base.session_id, UpdateMode(mode))
            outcome = manager.apply_edits(session.session_id, [TextEdit(*edit)])
            assert manager.text(session.session_id) == real
            prediction = manager.predict(session.session_id, len(real))
            results[mode] = {"seconds": outcome.seconds, "tokens_encoded": outcome.tokens_encoded,
                             "prediction": prediction, "tokens": outcome.tokens}
            manager.close(session.session_id)
    finally:
        manager.close(base.session_id)
    return results


def collect(manager, tokenizer, files, samples: int, context_tokens: int, seed: int, modes: list[str],
            checkpoint=None) -> list[dict]:
    rng = random.Random(seed)
    kinds = ["insert", "delete", "replace"]
    rows = []
    while len(rows) < samples:
        path, lines = rng.choice(files)
        cut = cut_context(tokenizer, lines, context_tokens, rng)
        if cut is None:
            continue
        context, target = cut
        kind = kinds[len(rows) % 3]
        pre, edit = make_edit(context, kind, lines, rng)
        began = time.perf_counter()
        results = run_sample(manager, pre, edit, "".join(context), modes)
        row = {"file": path.name, "kind": kind, "target": target.strip(), "results": results}
        for mode in modes:
            results[mode]["exact_match"] = results[mode]["prediction"].strip() == target.strip()
        rows.append(row)
        if checkpoint:
            checkpoint(rows)  # partial results survive an interrupted run
        tokens = results[modes[0]]["tokens"]
        log(f"[{len(rows)}/{samples}] {path.name} {kind} {tokens} tokens, {time.perf_counter() - began:.1f}s: "
            + " ".join(f"{m}={'EM' if results[m]['exact_match'] else '--'}/{results[m]['seconds'] * 1000:.0f}ms"
                       for m in modes))
    return rows


def summarise(rows: list[dict], modes: list[str]) -> dict:
    summary = {}
    full_seconds = statistics.mean(r["results"]["full"]["seconds"] for r in rows)
    for mode in modes:
        seconds = [r["results"][mode]["seconds"] for r in rows]
        summary[mode] = {
            "exact_match": 100 * statistics.mean(r["results"][mode]["exact_match"] for r in rows),
            "same_as_full": 100 * statistics.mean(
                r["results"][mode]["prediction"] == r["results"]["full"]["prediction"] for r in rows),
            "update_ms_mean": 1000 * statistics.mean(seconds),
            "update_ms_p50": 1000 * statistics.median(seconds),
            "time_saved_vs_full": 100 * (1 - statistics.mean(seconds) / full_seconds),
            "tokens_encoded_mean": statistics.mean(r["results"][mode]["tokens_encoded"] for r in rows),
        }
    return summary


def print_table(title: str, summary: dict, samples: int) -> None:
    print(f"\n{title} ({samples} samples)")
    print(f"{'mode':<10}{'EM %':>8}{'same as full %':>16}{'update ms':>12}{'p50 ms':>10}{'saved vs full':>15}{'tokens enc':>12}")
    for mode, s in summary.items():
        print(f"{mode:<10}{s['exact_match']:>8.1f}{s['same_as_full']:>16.1f}{s['update_ms_mean']:>12.1f}"
              f"{s['update_ms_p50']:>10.1f}{s['time_saved_vs_full']:>14.1f}%{s['tokens_encoded_mean']:>12.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--context-tokens", type=int, default=2048)
    parser.add_argument("--timing-samples", type=int, default=6)
    parser.add_argument("--timing-tokens", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "pie.json"))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core box two threads per process oversubscribe it)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)

    from longbow.services.config import EngineConfig, LongbowConfig, ModelSource, SessionsConfig
    from longbow.services.engine.engine import LLMEngine
    from longbow.services.text.sessions import SessionManager
    from longbow.services.engine.weights import load_tokenizer

    config = LongbowConfig(model=ModelSource(device="cpu", dtype="float32"),
                           engine=EngineConfig(token_budget=512, block_size=16, num_blocks=2048))
    engine = LLMEngine(config)
    tokenizer = load_tokenizer(engine.loaded.checkpoint)
    # No drift re-encodes inside the benchmark: each sample measures one edit.
    sessions = SessionsConfig(max_document_tokens=8192, drift_budget_tokens=10**9, max_sessions=16,
                              max_sessions_per_client=16)
    manager = SessionManager(engine, tokenizer, sessions)
    files = stdlib_files(tokenizer, args.context_tokens)
    log(f"{len(files)} standard-library files; {args.samples} samples at ~{args.context_tokens} tokens")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(stage: str):
        return lambda rows: out.with_suffix(f".{stage}.partial.json").write_text(json.dumps(rows, indent=1))

    quality = collect(manager, tokenizer, files, args.samples, args.context_tokens, args.seed, MODES, save("quality"))
    log(f"timing: {args.timing_samples} samples at ~{args.timing_tokens} tokens")
    timing_files = stdlib_files(tokenizer, args.timing_tokens)
    timing = collect(manager, tokenizer, timing_files, args.timing_samples, args.timing_tokens, args.seed + 1, MODES,
                     save("timing"))
    report = {
        "command": "python bench/pie.py " + " ".join(sys.argv[1:]),
        "load_average_at_end": list(__import__("os").getloadavg()),
        "quality": {"context_tokens": args.context_tokens, "samples": len(quality), "summary": summarise(quality, MODES)},
        "timing": {"context_tokens": args.timing_tokens, "samples": len(timing), "summary": summarise(timing, MODES)},
        "rows": {"quality": quality, "timing": timing},
    }
    print_table(f"next-line exact match and update time at ~{args.context_tokens} tokens", report["quality"]["summary"], len(quality))
    print_table(f"update time at ~{args.timing_tokens} tokens", report["timing"]["summary"], len(timing))
    out.write_text(json.dumps(report, indent=1))
    for stage in ("quality", "timing"):
        out.with_suffix(f".{stage}.partial.json").unlink(missing_ok=True)
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
