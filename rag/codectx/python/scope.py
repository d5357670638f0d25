"""The typing context of a hole: the names in scope there and their types, by our own resolver
(annotations, constructor calls, return annotations of called functions; no inference beyond that).

NOTE: not jedi. jedi resolves the benchmark's gold (bench/codectx.py) and needs ~1 s per function there
(a few dozen goto calls on cold caches), far over an IDE's per-keystroke budget; this resolver takes a
few ms and covers annotated code, which is what typed-hole context is about.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

from longbow.rag.codectx.python.definitions import Definition
from longbow.rag.codectx.python.index import PythonIndex
from longbow.rag.codectx.python.parsing import SENTINEL, ParsedHole

_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)
_LITERAL_TYPES = {bool: "bool", int: "int", float: "float", str: "str", bytes: "bytes", type(None): "None"}


@dataclass(frozen=True)
class Binding:
    """A name in scope: `type_text` is "" when unknown; `scope` is "local", "class" or "module"."""

    name: str
    type_text: str
    scope: str
    line: int
    kind: str = "variable"  # variable, parameter, function, class, import


class ScopeResolver:
    """Answers "what is in scope at the hole, and what type does this expression have" for one file."""

    def __init__(self, parsed: ParsedHole, index: PythonIndex, path: str):
        self.parsed, self.index, self.path = parsed, index, path
        self.functions = [n for n in parsed.ancestors() if isinstance(n, (*_FUNCTIONS, ast.Lambda))]
        self.enclosing_class = next((n for n in parsed.ancestors() if isinstance(n, ast.ClassDef)), None)
        self._bindings: dict[str, Binding] | None = None

    def bindings(self) -> dict[str, Binding]:
        """Innermost scope wins; within a function only names bound above the hole line count, the last
        binding before the hole winning. NOTE: built outer to inner, statement by statement, into the
        dict `type_of` reads, so `b = a.x` sees the type `a` got just above it (and never recurses)."""
        if self._bindings is None:
            self._bindings = {}
            for binding in self._module_bindings():
                self._bindings.setdefault(binding.name, binding)  # module names: the first definition
            for function in reversed(self.functions):
                for binding in self._function_bindings(function):
                    self._bindings[binding.name] = binding
        return self._bindings

    def type_of_name(self, name: str) -> str:
        binding = self.bindings().get(name)
        return binding.type_text if binding else ""

    def type_of(self, node: ast.AST | None) -> str:
        """The annotation text of an expression's type, or "" when our rules cannot tell."""
        if isinstance(node, ast.Constant):
            return _LITERAL_TYPES.get(type(node.value), "")
        if isinstance(node, ast.Name):
            return "" if node.id == SENTINEL else self.type_of_name(node.id) or self._class_name(node.id)
        if isinstance(node, ast.Attribute):
            return self._attribute_type(node)
        if isinstance(node, ast.Call):
            return self._call_type(node)
        if isinstance(node, (ast.List, ast.ListComp)):
            return "list"
        if isinstance(node, (ast.Dict, ast.DictComp)):
            return "dict"
        if isinstance(node, ast.JoinedStr):
            return "str"
        if isinstance(node, ast.Compare):
            return "bool"
        return ""

    def callee(self, func: ast.expr) -> Definition | None:
        """The function or class a call goes to: a name in the index, or a method of a known receiver."""
        if isinstance(func, ast.Name):
            return self.index.resolve(func.id, self.path)
        if isinstance(func, ast.Attribute):
            owner = _head(self.type_of(func.value)) or _head(self._class_name(ast.unparse(func.value)))
            method = self.index.methods_of(owner).get(func.attr) if owner else None
            if method is None and self._is_module(func.value):
                return self.index.resolve(func.attr, self.path)
            return method
        return None

    def _is_module(self, node: ast.expr) -> bool:
        binding = self.bindings().get(node.id) if isinstance(node, ast.Name) else None
        return binding is not None and binding.type_text == "module"

    def _class_name(self, name: str) -> str:
        definition = self.index.resolve(name.split(".")[-1], self.path)
        return f"type[{definition.name}]" if definition is not None and definition.is_type else ""

    def _attribute_type(self, node: ast.Attribute) -> str:
        owner = _head(self.type_of(node.value))
        definition = self.index.resolve(owner, self.path) if owner else None
        if definition is None:
            return ""
        fields = dict(definition.fields)
        if node.attr in fields:
            return fields[node.attr]
        method = self.index.methods_of(definition.name).get(node.attr)
        return method.returns if method is not None and "property" in method.text.split("def")[0] else ""

    def _call_type(self, node: ast.Call) -> str:
        target = self.callee(node.func)
        if target is None:
            return ""
        if target.is_type:
            return target.name
        return target.returns

    def _function_bindings(self, function: ast.AST):
        for arg in _arguments(function):
            yield self._parameter_binding(arg, function)
        body = function.body if isinstance(function.body, list) else []
        for node in _walk_statements(body):
            if getattr(node, "lineno", 0) < self.parsed.line:
                yield from self._statement_bindings(node, "local")

    def _parameter_binding(self, arg: ast.arg, function: ast.AST) -> Binding:
        if arg.annotation is not None:
            return Binding(arg.arg, ast.unparse(arg.annotation), "local", arg.lineno, "parameter")
        first = _arguments(function)[:1] == [arg]
        if first and self.enclosing_class is not None and arg.arg in ("self", "cls"):
            name = self.enclosing_class.name
            return Binding(arg.arg, name if arg.arg == "self" else f"type[{name}]", "local", arg.lineno, "parameter")
        return Binding(arg.arg, "", "local", arg.lineno, "parameter")

    def _statement_bindings(self, node: ast.AST, scope: str) -> list[Binding]:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            return [Binding(node.target.id, ast.unparse(node.annotation), scope, node.lineno)]
        if isinstance(node, ast.Assign):
            type_text = self.type_of(node.value)
            return [Binding(t.id, type_text, scope, node.lineno) for t in node.targets if isinstance(t, ast.Name)]
        if isinstance(node, (ast.For, ast.AsyncFor)) and isinstance(node.target, ast.Name):
            return [Binding(node.target.id, _element_type(self.type_of(node.iter)), scope, node.lineno)]
        if isinstance(node, (ast.With, ast.AsyncWith)):
            return [Binding(item.optional_vars.id, self.type_of(item.context_expr), scope, node.lineno)
                    for item in node.items if isinstance(item.optional_vars, ast.Name)]
        if isinstance(node, _FUNCTIONS):
            return [Binding(node.name, _callable_text(node), scope, node.lineno, "function")]
        if isinstance(node, ast.ClassDef):
            return [Binding(node.name, f"type[{node.name}]", scope, node.lineno, "class")]
        return []

    def _module_bindings(self):
        for node in self.parsed.tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                yield from self._import_bindings(node)
            else:
                yield from self._statement_bindings(node, "module")

    def _import_bindings(self, node: ast.Import | ast.ImportFrom) -> list[Binding]:
        bindings = []
        for alias in node.names:
            local = alias.asname or alias.name.split(".")[0]
            if local == "*":
                continue
            definition = self.index.resolve(local, self.path) if isinstance(node, ast.ImportFrom) else None
            type_text = _definition_type(definition) if definition else "module" if isinstance(node, ast.Import) else ""
            bindings.append(Binding(local, type_text, "module", node.lineno, "import"))
        return bindings


def _definition_type(definition: Definition) -> str:
    if definition.is_type:
        return f"type[{definition.name}]"
    params = ", ".join(f"{n}: {a}" if a else n for n, a in definition.params)
    return f"({params}) -> {definition.returns or 'Any'}"


def _callable_text(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    returns = ast.unparse(node.returns) if node.returns else "Any"
    return f"({ast.unparse(node.args)}) -> {returns}"


def _arguments(function: ast.AST) -> list[ast.arg]:
    args = function.args
    return [*args.posonlyargs, *args.args, *([args.vararg] if args.vararg else []), *args.kwonlyargs,
            *([args.kwarg] if args.kwarg else [])]


def _walk_statements(body: list[ast.stmt]):
    """Statements of a function body, descending into blocks but not into nested functions or classes."""
    for node in body:
        yield node
        if isinstance(node, (*_FUNCTIONS, ast.ClassDef)):
            continue
        for field_name in ("body", "orelse", "finalbody", "handlers"):
            children = getattr(node, field_name, None)
            if isinstance(children, list):
                yield from _walk_statements([c for c in children if isinstance(c, ast.stmt)])
                for handler in children:
                    if isinstance(handler, ast.ExceptHandler):
                        yield from _walk_statements(handler.body)


def _head(type_text: str) -> str:
    """`Optional[Console]` -> Console; `type[Foo]` -> Foo; `list[int]` -> list."""
    text = type_text.strip().strip("'\"")
    for wrapper in ("Optional[", "type[", "Type["):
        if text.startswith(wrapper) and text.endswith("]"):
            text = text[len(wrapper):-1]
    text = text.split("|")[0].strip()
    return text.split("[")[0].split(".")[-1]


def _element_type(type_text: str) -> str:
    for container in ("list[", "List[", "set[", "Set[", "Sequence[", "Iterable[", "Iterator[", "frozenset["):
        if type_text.startswith(container) and type_text.endswith("]"):
            return type_text[len(container):-1]
    return ""
