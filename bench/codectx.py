"""Definition-recall benchmark for typed-hole code context, on real typed Python nobody here wrote.

Workspace: copies of the installed `rich` and `typer` packages (~52k lines) in a temp directory.
Tasks: functions of `rich` with a return annotation, sampled with a fixed seed, in two kinds:
  body    the whole body (after the docstring) blanked, cursor on the empty body line;
  return  the expression of the final `return` blanked, cursor after `return `.
Gold: the non-local workspace definitions the original blanked code uses (jedi `goto` on every name
and attribute of the original file), plus the type closure of the function's annotations (jedi on the
annotation names, then one more level through those classes' fields, bases and alias targets).

Contexts compared at each token budget: none; lexical window (3/4 before the cursor, 1/4 after); whole
file from the top; BM25 snippets (Tabby-like: 768-character line-aligned chunks of the workspace, query =
the 20 lines before the cursor, the blanked function's own chunks excluded); ours (rag.codectx).
Metrics: recall (gold definitions defined in the context), precision (definitions in the context that
are gold), sufficiency (tasks whose every gold name is defined or bound in the context: imports and
typed bindings count) and latency of ours, cold (fresh service: indexing included) and warm.

Tokens are counted with rag.codectx.packing.approximate_tokens (3.5 characters a token) for every
method alike, so budgets compare like with like without loading the model.

    python bench/codectx.py                 # default: 200 tasks sampled, budgets 512 and 1024 (~2-3 min)
    python bench/codectx.py --tasks 40      # quicker
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import bm25s
import jedi
import rich
import typer

ROOT = Path(__file__).resolve().parent.parent

from longbow.rag.codectx.packing import approximate_tokens
from longbow.rag.codectx.service import CodeContextService, HoleRequest
from longbow.rag.codectx.workspace import WorkspaceLimits

PACKAGES = {"rich": Path(rich.__file__).parent, "typer": Path(typer.__file__).parent}
TASK_PACKAGE = "rich"
METHODS = ["none", "lexical", "whole_file", "bm25", "ours"]
BM25_CHUNK_CHARS = 768
BM25_QUERY_LINES = 20
_DEFINED = re.compile(r"^[ \t]*(?:async[ \t]+)?def[ \t]+(\w+)|^[ \t]*class[ \t]+(\w+)|^(\w+)[ \t]*(?::[^=\n]*)?=",
                      re.MULTILINE)
_BOUND = re.compile(r"^[ \t]*(?:from[ \t]+[\w.]+[ \t]+)?import[ \t]+([^\n#]+)|^[ \t]*(\w+):[ \t]", re.MULTILINE)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Task:
    kind: str  # body or return
    path: str  # relative to the workspace root
    function: str
    blanked: str  # the file with the hole blanked
    line: int
    column: int  # 1-based, characters
    span: tuple[int, int]  # the function's lines in the original file
    gold: set[tuple[str, int, str]] = field(default_factory=set)  # (path, line, name)

    @property
    def gold_names(self) -> set[str]:
        return {name for _, _, name in self.gold}


# ---------------------------------------------------------------- workspace and tasks

def make_workspace(directory: Path) -> Path:
    root = directory / "ws"
    for name, source in PACKAGES.items():
        shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def count_lines(root: Path) -> int:
    return sum(p.read_text(encoding="utf-8").count("\n") for p in root.rglob("*.py"))


def character_column(line_text: str, byte_offset: int) -> int:
    """ast columns are UTF-8 byte offsets; IDEs (and our API) count characters."""
    return len(line_text.encode("utf-8")[:byte_offset].decode("utf-8", "replace"))


def candidate_tasks(root: Path) -> list[Task]:
    tasks = []
    for path in sorted((root / TASK_PACKAGE).rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        text = path.read_text(encoding="utf-8")
        for function in _functions(ast.parse(text)):
            tasks.extend(t for t in (_body_task(relative, text, function), _return_task(relative, text, function)) if t)
    return tasks


def _functions(tree: ast.Module):
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node
        elif isinstance(node, ast.ClassDef):
            yield from (m for m in node.body if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef)))


def _statements(function) -> list[ast.stmt]:
    return function.body[1:] if ast.get_docstring(function) is not None else function.body


def _annotated(function) -> bool:
    return function.returns is not None and ast.unparse(function.returns) not in ("None", "NoReturn")


def _body_task(relative: str, text: str, function) -> Task | None:
    body = _statements(function)
    if not _annotated(function) or len(body) < 2:
        return None
    lines = text.split("\n")
    first, last = body[0].lineno, body[-1].end_lineno
    indent = " " * (len(lines[first - 1]) - len(lines[first - 1].lstrip()))
    blanked = "\n".join([*lines[: first - 1], indent, *lines[last:]])
    return Task("body", relative, function.name, blanked, first, len(indent) + 1,
                (function.lineno, function.end_lineno))


def _return_task(relative: str, text: str, function) -> Task | None:
    body = _statements(function)
    final = body[-1] if body else None
    if not _annotated(function) or not isinstance(final, ast.Return) or final.value is None \
            or isinstance(final.value, ast.Constant) or len(body) < 2:
        return None
    lines = text.split("\n")
    value = final.value
    start = character_column(lines[value.lineno - 1], value.col_offset)
    end = character_column(lines[value.end_lineno - 1], value.end_col_offset)
    head, tail = lines[value.lineno - 1][:start], lines[value.end_lineno - 1][end:]
    blanked = "\n".join([*lines[: value.lineno - 1], head + tail, *lines[value.end_lineno:]])
    return Task("return", relative, function.name, blanked, value.lineno, start + 1,
                (function.lineno, function.end_lineno))


def sample_tasks(candidates: list[Task], count: int) -> list[Task]:
    chooser = random.Random(0)
    chosen = []
    for kind in ("body", "return"):
        pool = [t for t in candidates if t.kind == kind]
        chosen += chooser.sample(pool, min(len(pool), count // 2))
    return chosen


# ---------------------------------------------------------------- gold with jedi

class GoldResolver:
    """jedi on the original files: what each name of the blanked code refers to, kept when it is a
    definition in the workspace outside the function itself."""

    def __init__(self, root: Path):
        self.root = root
        self.project = jedi.Project(str(root), added_sys_path=[str(root)], smart_sys_path=False)
        self._scripts: dict[str, jedi.Script] = {}
        self._trees: dict[str, ast.Module] = {}

    def gold(self, task: Task) -> set[tuple[str, int, str]]:
        tree = self._tree(task.path)
        function = next(f for f in _functions(tree) if (f.lineno, f.end_lineno) == task.span)
        region = _statements(function) if task.kind == "body" else [_statements(function)[-1].value]
        found = set()
        for node in _name_nodes(region)[:40]:
            found |= self._resolve(task.path, node, task.span)
        found |= self._annotation_closure(task.path, function)
        return found

    def _annotation_closure(self, path: str, function) -> set[tuple[str, int, str]]:
        annotations = [a.annotation for a in ast.walk(function.args) if isinstance(a, ast.arg) and a.annotation]
        annotations.append(function.returns)
        level = set()
        for node in _name_nodes(annotations)[:20]:
            level |= self._resolve(path, node, (0, 0))
        closure = set(level)
        for definition_path, line, _ in list(level)[:10]:
            definition = self._definition_node(definition_path, line)
            if definition is not None:
                for node in _name_nodes(_type_parts(definition))[:10]:
                    closure |= self._resolve(definition_path, node, (0, 0))
        return closure

    def _resolve(self, path: str, node: ast.AST, span: tuple[int, int]) -> set[tuple[str, int, str]]:
        line, column = _name_position(node, self._lines(path))
        try:
            names = self._script(path).goto(line, column, follow_imports=True)
        except Exception:  # noqa: BLE001  NOTE: jedi raises assorted internal errors on odd code; no gold then
            return set()
        found = set()
        for name in names:
            relative = self._relative(name.module_path)
            if relative is None or name.line is None or name.type not in ("class", "function", "statement"):
                continue
            if relative == path and span[0] <= name.line <= span[1]:
                continue  # a local of the function itself
            if name.type == "statement" and not self._lines(relative)[name.line - 1][:1].strip():
                continue  # only module-level variables and aliases are definitions
            found.add((relative, name.line, name.name))
        return found

    def _relative(self, module_path) -> str | None:
        if module_path is None:
            return None
        path = Path(module_path)
        for name, source in PACKAGES.items():
            for base in (self.root / name, source):
                if base in path.parents:
                    return f"{name}/{path.relative_to(base).as_posix()}"
        return None

    def _definition_node(self, path: str, line: int):
        for node in ast.walk(self._tree(path)):
            if isinstance(node, (ast.ClassDef, ast.Assign, ast.AnnAssign)) and node.lineno == line:
                return node
        return None

    def _script(self, path: str) -> jedi.Script:
        if path not in self._scripts:
            self._scripts[path] = jedi.Script(path=str(self.root / path), project=self.project)
        return self._scripts[path]

    def _tree(self, path: str) -> ast.Module:
        if path not in self._trees:
            self._trees[path] = ast.parse((self.root / path).read_text(encoding="utf-8"))
        return self._trees[path]

    def _lines(self, path: str) -> list[str]:
        return (self.root / path).read_text(encoding="utf-8").split("\n")


def _type_parts(definition) -> list[ast.AST]:
    if isinstance(definition, ast.ClassDef):
        return [*definition.bases, *(n.annotation for n in definition.body if isinstance(n, ast.AnnAssign))]
    return [definition.value] if definition.value is not None else []


def _name_nodes(roots: list[ast.AST]) -> list[ast.AST]:
    """Names and attribute accesses under `roots`, each distinct text once, in source order."""
    seen, nodes = set(), []
    for root in roots:
        for node in ast.walk(root):
            key = ast.unparse(node) if isinstance(node, (ast.Name, ast.Attribute)) else None
            if key and key not in seen and (not isinstance(node, ast.Name) or isinstance(node.ctx, ast.Load)):
                seen.add(key)
                nodes.append(node)
    return sorted(nodes, key=lambda n: (n.lineno, n.col_offset))


def _name_position(node: ast.AST, lines: list[str]) -> tuple[int, int]:
    if isinstance(node, ast.Attribute):
        line = node.end_lineno
        return line, character_column(lines[line - 1], node.end_col_offset) - len(node.attr)
    return node.lineno, character_column(lines[node.lineno - 1], node.col_offset)


# ---------------------------------------------------------------- contexts

def truncate_to_tokens(text: str, budget: int, from_end: bool = False) -> str:
    lines = text.split("\n")
    kept, used = [], 0
    for line in reversed(lines) if from_end else lines:
        cost = approximate_tokens(line + "\n")
        if used + cost > budget:
            break
        kept.append(line)
        used += cost
    return "\n".join(reversed(kept) if from_end else kept)


def lexical_context(task: Task, budget: int) -> str:
    lines = task.blanked.split("\n")
    before = "\n".join(lines[: task.line - 1] + [lines[task.line - 1][: task.column - 1]])
    after = "\n".join([lines[task.line - 1][task.column - 1:], *lines[task.line:]])
    return truncate_to_tokens(before, budget * 3 // 4, from_end=True) + truncate_to_tokens(after, budget // 4)


def whole_file_context(task: Task, budget: int) -> str:
    return truncate_to_tokens(task.blanked, budget)


@dataclass
class Chunk:
    path: str
    first_line: int
    last_line: int
    text: str


class BM25Snippets:
    """Tabby-like retrieval: line-aligned chunks of about 768 characters, BM25 over identifier tokens."""

    def __init__(self, root: Path):
        self.chunks = [c for p in sorted(root.rglob("*.py")) for c in _chunks(p.relative_to(root).as_posix(),
                                                                             p.read_text(encoding="utf-8"))]
        self.retriever = bm25s.BM25()
        self.retriever.index(bm25s.tokenize([c.text for c in self.chunks], stopwords=None, show_progress=False),
                             show_progress=False)

    def context(self, task: Task, budget: int) -> str:
        lines = task.blanked.split("\n")
        query = "\n".join(lines[max(0, task.line - 1 - BM25_QUERY_LINES): task.line])
        tokens = bm25s.tokenize([query], stopwords=None, show_progress=False)
        results, _ = self.retriever.retrieve(tokens, k=min(60, len(self.chunks)), show_progress=False)
        parts, used = [], 0
        for index in results[0]:
            chunk = self.chunks[int(index)]
            if chunk.path == task.path and chunk.first_line <= task.span[1] and chunk.last_line >= task.span[0]:
                continue  # the blanked function itself (the original text would leak the answer)
            cost = approximate_tokens(chunk.text)
            if used + cost <= budget:
                parts.append(chunk.text)
                used += cost
        return "\n".join(parts)


def _chunks(path: str, text: str) -> list[Chunk]:
    chunks, current, first = [], [], 1
    for number, line in enumerate(text.split("\n"), 1):
        current.append(line)
        if sum(len(x) + 1 for x in current) >= BM25_CHUNK_CHARS:
            chunks.append(Chunk(path, first, number, "\n".join(current)))
            current, first = [], number + 1
    if current:
        chunks.append(Chunk(path, first, first + len(current) - 1, "\n".join(current)))
    return chunks


def ours_context(service: CodeContextService, root: Path, task: Task, budget: int) -> tuple[str, float]:
    request = HoleRequest(str(root), task.path, task.line, task.column, budget, {task.path: task.blanked})
    start = time.perf_counter()
    context = service.context(request)
    return context.packed_text, time.perf_counter() - start


# ---------------------------------------------------------------- metrics

def defined_names(context: str) -> set[str]:
    return {next(g for g in match.groups() if g) for match in _DEFINED.finditer(context)}


def bound_names(context: str) -> set[str]:
    names = set()
    for match in _BOUND.finditer(context):
        if match.group(1):
            for part in match.group(1).replace("(", "").replace(")", "").split(","):
                words = part.split()
                if words:
                    names.add(words[-1].split(".")[0])
        elif match.group(2):
            names.add(match.group(2))
    return names


def score(task: Task, context: str) -> dict:
    defined = defined_names(context)
    gold = task.gold_names
    hits = gold & defined
    return {"recall": len(hits) / len(gold), "precision": len(hits) / len(defined) if defined else 0.0,
            "sufficient": float(gold <= (defined | bound_names(context)))}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


# ---------------------------------------------------------------- run

def run(task_count: int, budgets: list[int], cold_runs: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="longbow-bench-codectx-") as scratch:
        root = make_workspace(Path(scratch))
        lines, files = count_lines(root), sum(1 for _ in root.rglob("*.py"))
        log(f"workspace: {', '.join(PACKAGES)} copied, {lines} lines")
        tasks = sample_tasks(candidate_tasks(root), task_count)
        resolver = GoldResolver(root)
        start = time.perf_counter()
        for number, task in enumerate(tasks, 1):
            task.gold = resolver.gold(task)
            if number % 10 == 0:
                log(f"gold {number}/{len(tasks)} ({time.perf_counter() - start:.0f} s)")
        tasks = [t for t in tasks if t.gold]
        log(f"{len(tasks)} tasks with a non-empty gold set; indexing BM25")
        bm25 = BM25Snippets(root)
        cold = measure_cold(root, tasks[:cold_runs], budgets[-1])
        service = _disk_service(root)
        rows, warm = evaluate(service, root, tasks, budgets, bm25)
    return {"workspace": {"packages": list(PACKAGES), "lines": lines, "python_files": files},
            "tasks": len(tasks), "task_kinds": {k: sum(t.kind == k for t in tasks) for k in ("body", "return")},
            "mean_gold": statistics.mean(len(t.gold) for t in tasks), "budgets": budgets, "results": rows,
            "latency_ms": {"warm_p50": 1000 * percentile(warm, 0.5), "warm_p95": 1000 * percentile(warm, 0.95),
                           "cold_p50": 1000 * percentile(cold, 0.5), "cold_p95": 1000 * percentile(cold, 0.95),
                           "warm_samples": len(warm), "cold_samples": len(cold)},
            "token_counter": "approximate_tokens (3.5 characters per token)"}


def _disk_service(root: Path) -> CodeContextService:
    # NOTE: the bench reads its workspace from disk and times a whole cold index, so the per-request read
    # limits that keep a gateway responsive (an index catches up over requests) are lifted here.
    limits = WorkspaceLimits(max_read_files=1_000_000, max_read_bytes=1 << 40, max_request_s=3600.0)
    return CodeContextService(limits, readable_roots=(str(root),))


def measure_cold(root: Path, tasks: list[Task], budget: int) -> list[float]:
    """A fresh service per task: the whole workspace is indexed inside the timed call."""
    timings = []
    for task in tasks:
        service = _disk_service(root)
        timings.append(ours_context(service, root, task, budget)[1])
        service.close()
    log(f"cold: {', '.join(f'{1000 * t:.0f} ms' for t in timings)}")
    return timings


def evaluate(service, root: Path, tasks: list[Task], budgets: list[int], bm25: BM25Snippets):
    ours_context(service, root, tasks[0], budgets[0])  # index once; every later call is warm
    scores = {(m, b): [] for m in METHODS for b in budgets}
    warm = []
    for number, task in enumerate(tasks, 1):
        for budget in budgets:
            text, elapsed = ours_context(service, root, task, budget)
            warm.append(elapsed)
            contexts = {"none": "", "lexical": lexical_context(task, budget),
                        "whole_file": whole_file_context(task, budget), "bm25": bm25.context(task, budget),
                        "ours": text}
            for method, context in contexts.items():
                scores[(method, budget)].append(score(task, context))
        if number % 20 == 0:
            log(f"evaluated {number}/{len(tasks)}")
    rows = [{"method": m, "budget": b, **{k: statistics.mean(s[k] for s in scores[(m, b)])
                                          for k in ("recall", "precision", "sufficient")}}
            for b in budgets for m in METHODS]
    return rows, warm


def print_table(result: dict) -> None:
    print(f"\nworkspace {'+'.join(result['workspace']['packages'])}: {result['workspace']['lines']} lines; "
          f"{result['tasks']} tasks {result['task_kinds']}; mean gold {result['mean_gold']:.1f} definitions")
    print(f"{'budget':>6}  {'method':<11}{'recall':>8}{'precision':>11}{'sufficiency':>13}")
    for row in result["results"]:
        print(f"{row['budget']:>6}  {row['method']:<11}{row['recall']:>8.3f}{row['precision']:>11.3f}"
              f"{row['sufficient']:>13.3f}")
    latency = result["latency_ms"]
    print(f"ours latency: warm p50 {latency['warm_p50']:.1f} ms, p95 {latency['warm_p95']:.1f} ms; "
          f"cold p50 {latency['cold_p50']:.0f} ms, p95 {latency['cold_p95']:.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--budgets", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--cold-runs", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "codectx.json"))
    args = parser.parse_args()
    result = run(args.tasks, args.budgets, args.cold_runs)
    print_table(result)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
