"""A small mutation runner: break one thing in one product module at a time and see whether that module's
fast unit tests notice. Driven by scripts/mutation.sh (which says how to run it); results are recorded in
docs/testing.md. Not part of CI.

Why not mutmut or cosmic-ray (mutmut 3.8.1 does install from PyPI here): this repository maps services/,
rag/ and ringattn/ into one `longbow` namespace through an editable-install finder that points at the
working tree's absolute paths, so any tool that mutates a copy must have that mapping redirected (done here
with a sitecustomize), and mutating the working tree itself is not an option while others work in it. Given
that, a runner of ~250 lines whose every step is visible (one AST edit, the module unparsed into a private
copy, the module's chosen tests in a subprocess with a time limit) was simpler to trust and to predict in
time on two shared cores than adapting mutmut's trampolines and test-mapping run or cosmic-ray's session
database and per-module configs; it was not tried with either tool.

Mutations (one per mutant): a comparison flipped at its boundary (< <=, > >=, == !=, is/is not,
in/not in); an arithmetic or bitwise operator swapped (+ -, * /, // *, % //, & |, << >>), also in augmented
assignments; `and`/`or` swapped; a `not` or a unary minus dropped; a number moved by one (0 -> 1, 1 -> 0,
n -> n + 1), True/False swapped; a call statement dropped (`pool.free(blocks)` -> `pass`). Strings,
docstrings, annotations, `raise` and `assert` statements and logging calls are not mutated: those mutants
are equivalent or only change a message.
A mutant is killed when the tests fail or run past the time limit (3x the clean run, plus 10 s).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COPIED = ["longbow", "services", "rag", "ringattn", "tests", "pyproject.toml", "setup.py"]
# The module -> its fast unit tests (no real model, no processes): what a mutant must fail.
MODULES = {
    "services/engine/scheduler.py": ["tests/engine/test_scheduler.py",
                                     "tests/engine/test_scheduler_edges.py"],
    "services/engine/sampler.py": ["tests/engine/test_sampler.py", "tests/engine/test_sampler_batched.py",
                                   "tests/engine/test_sampler_reference.py", "-m", "not slow"],
    "ringattn/merge.py": ["tests/ringattn/test_merge.py"],
    "ringattn/decode.py": ["tests/ringattn/test_schedules_emulated.py",
                           "tests/ringattn/test_causal_default.py", "-k", "decode or distributed"],
    "ringattn/tokenring.py": ["tests/ringattn/test_schedules_emulated.py",
                              "tests/ringattn/test_causal_default.py", "-k", "tokenring or distributed"],
    "services/text/edits.py": ["tests/text/test_edits.py"],
    "services/gateway/errors.py": ["tests/gateway/test_errors.py"],
    "services/engine/kv_cache.py": ["tests/engine/test_local_attention.py"],
}
SLOW: set[str] = set()  # modules whose tests load the real model (minutes per mutant): run when named
SWAPS = {
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
    ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In,
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Mult,
    ast.Mod: ast.FloorDiv, ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd, ast.LShift: ast.RShift,
    ast.RShift: ast.LShift, ast.Pow: ast.Mult, ast.And: ast.Or, ast.Or: ast.And,
}
SYMBOLS = {
    ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=", ast.Is: "is",
    ast.IsNot: "is not", ast.In: "in", ast.NotIn: "not in", ast.Add: "+", ast.Sub: "-", ast.Mult: "*",
    ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%", ast.BitAnd: "&", ast.BitOr: "|", ast.LShift: "<<",
    ast.RShift: ">>", ast.Pow: "**", ast.And: "and", ast.Or: "or",
}
LOGGERS = {"log", "logger", "logging", "warnings"}


@dataclass
class Mutant:
    index: int
    line: int
    change: str
    source: str  # the original line
    outcome: str = ""  # killed | survived | timeout
    seconds: float = 0.0


def candidates(tree: ast.Module) -> list[tuple[ast.AST, str, object]]:
    """(node, description, apply) in a fixed walk order; apply(node) edits the node in place (or returns a
    replacement statement). The same order on a fresh parse gives the same index for the same mutant."""
    found: list[tuple[ast.AST, str, object]] = []

    def visit(node: ast.AST, parent: ast.AST | None) -> None:
        if _skipped(node):
            return
        _mutations_of(node, parent, found)
        for name, value in ast.iter_fields(node):
            if name in ("annotation", "returns", "type_comment"):
                continue
            children = value if isinstance(value, list) else [value]
            for index, child in enumerate(children):
                if isinstance(child, ast.Expr) and isinstance(child.value, ast.Constant) and index == 0:
                    continue  # a docstring
                if isinstance(child, ast.AST):
                    visit(child, node)

    visit(tree, None)
    return found


def _skipped(node: ast.AST) -> bool:
    if isinstance(node, (ast.Raise, ast.Assert, ast.Import, ast.ImportFrom, ast.JoinedStr)):
        return True
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        owner = node.func.value
        return isinstance(owner, ast.Name) and owner.id in LOGGERS
    return False


def _mutations_of(node: ast.AST, parent, found: list) -> None:
    if isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            if type(op) in SWAPS:
                found.append((node, f"{SYMBOLS[type(op)]} -> {SYMBOLS[SWAPS[type(op)]]}",
                              lambda n, i=i: n.ops.__setitem__(i, SWAPS[type(n.ops[i])]())))
    elif isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in SWAPS and not _stringy(node):
        found.append((node, f"{SYMBOLS[type(node.op)]} -> {SYMBOLS[SWAPS[type(node.op)]]}",
                      lambda n: setattr(n, "op", SWAPS[type(n.op)]())))
    elif isinstance(node, ast.BoolOp):
        found.append((node, f"{SYMBOLS[type(node.op)]} -> {SYMBOLS[SWAPS[type(node.op)]]}",
                      lambda n: setattr(n, "op", SWAPS[type(n.op)]())))
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        found.append((node, "not x -> x", lambda n: n.operand))
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and not isinstance(
            node.operand, ast.Constant):
        found.append((node, "-x -> x", lambda n: n.operand))
    elif isinstance(node, ast.Constant) and type(node.value) is bool:
        found.append((node, f"{node.value} -> {not node.value}", lambda n: setattr(n, "value", not n.value)))
    elif isinstance(node, ast.Constant) and type(node.value) in (int, float):
        new = {0: 1, 1: 0}.get(node.value, node.value + 1)
        found.append((node, f"{node.value!r} -> {type(node.value)(new)!r}",
                      lambda n: setattr(n, "value", type(n.value)({0: 1, 1: 0}.get(n.value, n.value + 1)))))
    elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) and not _skipped(node.value):
        found.append((node, "call statement -> pass", lambda n: ast.Pass()))


def _stringy(node) -> bool:
    sides = [node.left, node.right] if isinstance(node, ast.BinOp) else [node.value]
    return any(isinstance(s, ast.JoinedStr) or (isinstance(s, ast.Constant) and isinstance(s.value, str))
               for s in sides)


def mutated_source(original: str, index: int) -> tuple[str, ast.AST, str]:
    tree = ast.parse(original)
    node, change, apply = candidates(tree)[index]
    replacement = apply(node)
    if isinstance(replacement, ast.AST):
        _replace(tree, node, replacement)
    return ast.unparse(ast.fix_missing_locations(tree)), node, change


def _replace(tree: ast.AST, old: ast.AST, new: ast.AST) -> None:
    for parent in ast.walk(tree):
        for name, value in ast.iter_fields(parent):
            if value is old:
                setattr(parent, name, new)
                return
            if isinstance(value, list) and any(v is old for v in value):
                value[[i for i, v in enumerate(value) if v is old][0]] = new
                return
    raise AssertionError("mutated node not found in its tree")


class WorkCopy:
    """The repository's sources in a temporary directory, and an interpreter environment whose `longbow`
    imports resolve there (the editable-install finder's mapping is redirected by a sitecustomize)."""

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="longbow-mutation-"))
        for name in COPIED:
            source = REPO / name
            if source.is_dir():
                skipped = shutil.ignore_patterns("__pycache__", ".hypothesis")
                shutil.copytree(source, self.root / name, ignore=skipped)
            else:
                shutil.copy2(source, self.root / name)
        site = self.root / "_mutation_site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(
            "import os, sys\n"
            "_old, _new = os.environ['LONGBOW_MUTATION_FROM'], os.environ['LONGBOW_MUTATION_TO']\n"
            "for _name, _module in list(sys.modules.items()):\n"
            "    if _name.startswith('__editable___longbow') and hasattr(_module, 'MAPPING'):\n"
            "        for _key, _path in list(_module.MAPPING.items()):\n"
            "            _module.MAPPING[_key] = _path.replace(_old, _new, 1)\n"
            "        for _key, _paths in list(_module.NAMESPACES.items()):\n"
            "            _module.NAMESPACES[_key] = [p.replace(_old, _new, 1) for p in _paths]\n")
        self.env = {**os.environ, "PYTHONPATH": str(site), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
                    "LONGBOW_MUTATION_FROM": str(REPO),
                    "LONGBOW_MUTATION_TO": str(self.root), "PYTHONDONTWRITEBYTECODE": "1"}

    def check_imports_resolve_here(self, module_path: str) -> None:
        dotted = "longbow." + module_path.removesuffix(".py").replace("/", ".")
        if module_path.startswith("longbow/"):
            dotted = module_path.removesuffix(".py").replace("/", ".")
        where = subprocess.run([sys.executable, "-c", f"import {dotted} as m; print(m.__file__)"],
                               cwd=self.root, env=self.env, capture_output=True, text=True, check=True)
        where = where.stdout.strip()
        assert where.startswith(str(self.root)), f"{dotted} imports from {where}, not the copy {self.root}"

    def run_tests(self, tests: list[str], timeout_s: float) -> tuple[str, float]:
        # NOTE: plugin autoload off, the plugins these tests use named: the installed ones (langsmith,
        # codspeed, benchmark, ...) cost ~20 s of start-up per run on a busy machine, the tests ~2 s.
        command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                   "-p", "pytest_timeout", "-p", "_hypothesis_pytestplugin", "--timeout", str(int(timeout_s) + 5), *tests]
        started = time.monotonic()
        try:
            done = subprocess.run(command, cwd=self.root, env=self.env, capture_output=True,
                                  timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return "timeout", time.monotonic() - started
        return ("survived" if done.returncode == 0 else "killed"), time.monotonic() - started

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def run_module(work: WorkCopy, module_path: str, tests: list[str], limit: int | None,
               only: list[int] | None = None) -> dict:
    target = work.root / module_path
    original = (REPO / module_path).read_text()
    lines = original.splitlines()
    work.check_imports_resolve_here(module_path)
    target.write_text(ast.unparse(ast.parse(original)))  # the clean run uses the unparsed module too
    outcome, clean_s = work.run_tests(tests, timeout_s=600)
    assert outcome == "survived", f"{module_path}: its tests fail on the unmutated (unparsed) module"
    timeout_s = 3 * clean_s + 10
    count = len(candidates(ast.parse(original)))
    chosen = range(count) if limit is None else range(min(count, limit))
    chosen = chosen if only is None else [i for i in only if i < count]
    print(f"{module_path}: {count} mutants, clean run {clean_s:.1f} s, limit {timeout_s:.0f} s each",
          flush=True)
    mutants, unchanged = [], ast.unparse(ast.parse(original))
    for index in chosen:
        source, node, change = mutated_source(original, index)
        if source == unchanged:
            continue
        mutant = Mutant(index, node.lineno, change, lines[node.lineno - 1].strip())
        target.write_text(source)
        mutant.outcome, mutant.seconds = work.run_tests(tests, timeout_s)
        mutants.append(mutant)
        if mutant.outcome == "survived":
            print(f"  SURVIVED line {mutant.line}: {change}   | {mutant.source}", flush=True)
        if len(mutants) % 20 == 0:
            print(f"  {len(mutants)}/{len(chosen)} run", flush=True)
    target.write_text(original)
    killed = sum(m.outcome != "survived" for m in mutants)
    rate = 100 * killed / max(1, len(mutants))
    print(f"{module_path}: {killed}/{len(mutants)} killed ({rate:.1f}%)", flush=True)
    return {"module": module_path, "tests": tests, "clean_run_s": round(clean_s, 1), "mutants": len(mutants),
            "killed": killed, "survivors": [asdict(m) for m in mutants if m.outcome == "survived"],
            "all": [asdict(m) for m in mutants]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help=f"default: all of {', '.join(set(MODULES) - SLOW)}")
    parser.add_argument("--limit", type=int, help="run only the first N mutants of each module")
    parser.add_argument("--only", help="only these mutant numbers (comma-separated, as --list shows them)")
    parser.add_argument("--json", default="mutation.json", help="where to write the results")
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    args = parser.parse_args()
    modules = args.modules or [m for m in MODULES if m not in SLOW]
    unknown = [m for m in modules if m not in MODULES]
    if unknown:
        parser.error(f"no tests chosen for {unknown}: known modules are {list(MODULES)}")
    if args.list:
        for module in modules:
            original = (REPO / module).read_text()
            for index, (node, change, _) in enumerate(candidates(ast.parse(original))):
                print(f"{module}:{node.lineno} #{index} {change}")
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still removes the work copy
    work, results = WorkCopy(), []
    try:
        for module in modules:
            only = [int(i) for i in args.only.split(",")] if args.only else None
            results.append(run_module(work, module, MODULES[module], args.limit, only))
            Path(args.json).write_text(json.dumps(results, indent=1))
    finally:
        work.remove()
    print(f"\n{'module':40} {'mutants':>8} {'killed':>7} {'rate':>7}")
    for r in results:
        rate = 100 * r["killed"] / max(1, r["mutants"])
        print(f"{r['module']:40} {r['mutants']:8d} {r['killed']:7d} {rate:6.1f}%")


if __name__ == "__main__":
    main()
