"""What one Python file defines and imports, extracted from its AST: the unit the workspace index
stores per file. Each definition carries a compact rendering (class bodies reduced to fields and method
signatures) and the type names it mentions, which the closure follows."""

from __future__ import annotations

import ast
import dataclasses
from dataclasses import dataclass, field

from longbow.rag.codectx.python.annotations import mentioned_names

MAX_CLASS_LINES = 30  # a rendered class keeps at most this many body lines
_TYPE_FACTORIES = frozenset({"NewType", "TypeVar", "NamedTuple", "TypedDict", "Enum", "ParamSpec"})
_TYPE_HEADS = frozenset({"Union", "Optional", "Callable", "Literal", "Annotated", "list", "dict", "set",
                         "tuple", "type", "List", "Dict", "Set", "Tuple", "Type", "Mapping", "Sequence",
                         "Iterable", "Iterator", "FrozenSet", "frozenset"})


@dataclass(frozen=True)
class Definition:
    """kind: class, dataclass, typeddict, protocol, enum, namedtuple, alias, function or method.
    For functions and methods: `params` are (name, annotation) without self/cls, `returns` the return
    annotation source ("" when missing); `owner` is the class of a method. For classes: `fields` are the
    annotated attributes. `mentions` are the type names the closure follows from here."""

    name: str
    kind: str
    path: str
    line: int
    text: str
    mentions: tuple[str, ...] = ()
    params: tuple[tuple[str, str], ...] = ()
    returns: str = ""
    owner: str = ""
    fields: tuple[tuple[str, str], ...] = ()

    @property
    def is_type(self) -> bool:
        return self.kind not in ("function", "method")


@dataclass
class ModuleSummary:
    """The index's record of one file: its definitions and its imports (local name -> (module, name);
    name is "" for `import module`)."""

    path: str
    module: str
    definitions: list[Definition] = field(default_factory=list)
    imports: dict[str, tuple[str, str]] = field(default_factory=dict)


def module_name(path: str) -> str:
    parts = path[:-3].split("/") if path.endswith(".py") else path.split("/")
    if parts and parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def summarize_module(tree: ast.Module, path: str, source: str | None = None,
                     memo: dict[str, tuple[int, list[Definition]]] | None = None) -> ModuleSummary:
    """With `source` and `memo` (statement text -> (first line, definitions)), top-level statements
    whose text is unchanged since the last summary reuse their definitions, shifted to their new line.
    NOTE: summarizing rich/console.py takes ~40 ms, mostly ast.unparse; an edit touches one statement."""
    summary = ModuleSummary(path, module_name(path))
    lines = source.split("\n") if source is not None and memo is not None else None
    fresh: dict[str, tuple[int, list[Definition]]] = {}
    for node in tree.body:
        summary.definitions.extend(_memoized_definitions(node, path, lines, memo, fresh))
        _collect_imports(node, summary)
    if memo is not None:
        memo.clear()
        memo.update(fresh)
    return summary


def _memoized_definitions(node: ast.stmt, path: str, lines: list[str] | None, memo, fresh) -> list[Definition]:
    if lines is None:
        return definitions_of(node, path)
    first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
    key = "\n".join(lines[first - 1: node.end_lineno or node.lineno])
    if key in memo:
        old_first, definitions = memo[key]
        if old_first != first:
            definitions = [dataclasses.replace(d, line=d.line + first - old_first) for d in definitions]
    else:
        definitions = definitions_of(node, path)
    fresh[key] = (first, definitions)
    return definitions


def definitions_of(node: ast.stmt, path: str) -> list[Definition]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return [function_definition(node, path)]
    if isinstance(node, ast.ClassDef):
        return [class_definition(node, path), *_methods(node, path)]
    if isinstance(node, ast.If):  # `if TYPE_CHECKING:` / version switches at module level
        return [d for child in node.body + node.orelse for d in definitions_of(child, path)]
    alias = _alias_definition(node, path)
    return [alias] if alias else []


def function_definition(node: ast.FunctionDef | ast.AsyncFunctionDef, path: str, owner: str = "") -> Definition:
    params = tuple((a.arg, ast.unparse(a.annotation) if a.annotation else "") for a in _parameters(node, owner))
    returns = ast.unparse(node.returns) if node.returns else ""
    mentions = [n for a in _parameters(node, owner) for n in mentioned_names(a.annotation)]
    mentions += mentioned_names(node.returns)
    return Definition(node.name, "method" if owner else "function", path, node.lineno, signature_text(node),
                      tuple(dict.fromkeys(mentions)), params, returns, owner)


def signature_text(node: ast.FunctionDef | ast.AsyncFunctionDef, indent: str = "") -> str:
    prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
    returns = f" -> {ast.unparse(node.returns)}" if node.returns else ""
    decorators = "".join(f"{indent}@{ast.unparse(d)}\n" for d in node.decorator_list if _kept_decorator(d))
    return f"{decorators}{indent}{prefix} {node.name}({ast.unparse(node.args)}){returns}: ..."


def _kept_decorator(decorator: ast.expr) -> bool:
    return ast.unparse(decorator).split(".")[-1] in ("property", "staticmethod", "classmethod", "overload")


def _parameters(node: ast.FunctionDef | ast.AsyncFunctionDef, owner: str) -> list[ast.arg]:
    args = node.args
    positional = [*args.posonlyargs, *args.args]
    static = any(ast.unparse(d) == "staticmethod" for d in node.decorator_list)
    if owner and positional and not static:
        positional = positional[1:]  # self / cls
    return [*positional, *([args.vararg] if args.vararg else []), *args.kwonlyargs,
            *([args.kwarg] if args.kwarg else [])]


def _methods(node: ast.ClassDef, path: str) -> list[Definition]:
    return [function_definition(child, path, owner=node.name) for child in node.body
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and _public_method(child.name)]


def _public_method(name: str) -> bool:
    return not name.startswith("_") or name in ("__init__", "__call__", "__enter__", "__iter__", "__getitem__")


def class_kind(node: ast.ClassDef) -> str:
    bases = {ast.unparse(b).split(".")[-1].split("[")[0] for b in node.bases}
    decorators = {ast.unparse(d).split("(")[0].split(".")[-1] for d in node.decorator_list}
    if "dataclass" in decorators:
        return "dataclass"
    for base, kind in (("TypedDict", "typeddict"), ("Protocol", "protocol"), ("NamedTuple", "namedtuple")):
        if base in bases:
            return kind
    if bases & {"Enum", "IntEnum", "StrEnum", "Flag", "IntFlag"}:
        return "enum"
    return "class"


def class_definition(node: ast.ClassDef, path: str) -> Definition:
    kind = class_kind(node)
    fields = tuple((t.target.id, ast.unparse(t.annotation)) for t in node.body
                   if isinstance(t, ast.AnnAssign) and isinstance(t.target, ast.Name))
    fields += _init_fields(node)
    mentions = [n for b in node.bases for n in mentioned_names(b)]
    mentions += [n for t in node.body if isinstance(t, ast.AnnAssign) for n in mentioned_names(t.annotation)]
    if kind == "protocol":
        mentions += [n for m in node.body if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))
                     for n in function_definition(m, path, node.name).mentions]
    return Definition(node.name, kind, path, node.lineno, class_text(node), tuple(dict.fromkeys(mentions)),
                      fields=fields)


def _init_fields(node: ast.ClassDef) -> tuple[tuple[str, str], ...]:
    """`self.x: T = ...` inside __init__: attributes a plain class declares where it sets them."""
    init = next((m for m in node.body if isinstance(m, ast.FunctionDef) and m.name == "__init__"), None)
    if init is None:
        return ()
    return tuple((s.target.attr, ast.unparse(s.annotation)) for s in ast.walk(init)
                 if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Attribute)
                 and isinstance(s.target.value, ast.Name) and s.target.value.id == "self")


def class_text(node: ast.ClassDef) -> str:
    decorators = "".join(f"@{ast.unparse(d)}\n" for d in node.decorator_list)
    bases = [ast.unparse(b) for b in node.bases] + [ast.unparse(k) for k in node.keywords]
    header = f"{decorators}class {node.name}{'(' + ', '.join(bases) + ')' if bases else ''}:"
    body = [line for child in node.body for line in _class_body_lines(child)]
    if len(body) > MAX_CLASS_LINES:
        body = body[:MAX_CLASS_LINES] + ["    ..."]
    return "\n".join([header, *(body or ["    ..."])])


def _class_body_lines(child: ast.stmt) -> list[str]:
    if isinstance(child, ast.Expr) and isinstance(child.value, ast.Constant) and isinstance(child.value.value, str):
        first = child.value.value.strip().splitlines()[0] if child.value.value.strip() else ""
        return [f'    """{first}"""'] if first else []
    if isinstance(child, (ast.AnnAssign, ast.Assign)):
        return ["    " + _first_line(ast.unparse(child), 100)]
    if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and _public_method(child.name):
        return signature_text(child, "    ").splitlines()
    return []


def _first_line(text: str, limit: int) -> str:
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _alias_definition(node: ast.stmt, path: str) -> Definition | None:
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None \
            and ast.unparse(node.annotation).split(".")[-1] == "TypeAlias":
        return _alias(node.target.id, node.value, node, path)
    type_alias_node = getattr(ast, "TypeAlias", None)  # `type X = ...`, Python 3.12+
    if type_alias_node is not None and isinstance(node, type_alias_node):
        return _alias(node.name.id, node.value, node, path)
    if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) \
            and _looks_like_type(node.value):
        return _alias(node.targets[0].id, node.value, node, path)
    return None


def _alias(name: str, value: ast.expr, node: ast.stmt, path: str) -> Definition:
    kind = "alias"
    if isinstance(value, ast.Call) and ast.unparse(value.func).split(".")[-1] in ("NamedTuple", "TypedDict"):
        kind = ast.unparse(value.func).split(".")[-1].lower()
    return Definition(name, kind, path, node.lineno, _first_line(ast.unparse(node), 300),
                      tuple(mentioned_names(value)))


def _looks_like_type(value: ast.expr) -> bool:
    if isinstance(value, ast.Call):
        return ast.unparse(value.func).split(".")[-1] in _TYPE_FACTORIES - {"TypeVar", "ParamSpec"}
    if isinstance(value, ast.Subscript):
        return ast.unparse(value.value).split(".")[-1] in _TYPE_HEADS
    if isinstance(value, ast.BinOp) and isinstance(value.op, ast.BitOr):
        return all(isinstance(side, (ast.Name, ast.Attribute, ast.Subscript, ast.BinOp, ast.Constant))
                   for side in (value.left, value.right)) and not isinstance(value.left, ast.Constant)
    return False


def _collect_imports(node: ast.stmt, summary: ModuleSummary) -> None:
    if isinstance(node, ast.Import):
        for alias in node.names:
            summary.imports[alias.asname or alias.name.split(".")[0]] = (alias.name, "")
    elif isinstance(node, ast.ImportFrom):
        module = _absolute_module(node, summary)
        for alias in node.names:
            if alias.name != "*":
                summary.imports[alias.asname or alias.name] = (module, alias.name)
    elif isinstance(node, ast.If):
        for child in node.body + node.orelse:
            _collect_imports(child, summary)


def _absolute_module(node: ast.ImportFrom, summary: ModuleSummary) -> str:
    if not node.level:
        return node.module or ""
    package = summary.module.split(".")
    if not summary.path.endswith("__init__.py"):
        package = package[:-1]
    base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
    return ".".join([*base, *([node.module] if node.module else [])])
