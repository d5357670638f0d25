"""Python type annotations as data: the names an annotation mentions and a normalized shape
(`TypeShape`) that header ranking compares against the goal."""

from __future__ import annotations

import ast
from dataclasses import dataclass

# Names that never resolve to a workspace definition; skipping them keeps closures small.
BUILTIN_TYPE_NAMES = frozenset({
    "int", "str", "float", "bool", "bytes", "complex", "None", "object", "type", "list", "dict", "set",
    "tuple", "frozenset", "bytearray", "memoryview", "range", "slice", "Any", "Optional", "Union", "List",
    "Dict", "Set", "Tuple", "FrozenSet", "Type", "Callable", "Iterable", "Iterator", "Generator",
    "AsyncIterator", "AsyncIterable", "AsyncGenerator", "Awaitable", "Coroutine", "Sequence",
    "MutableSequence", "Mapping", "MutableMapping", "Literal", "Annotated", "ClassVar", "Final", "TypeVar",
    "Generic", "Protocol", "NoReturn", "Never", "Self", "TypeAlias", "TypeGuard", "ParamSpec", "Concatenate",
    "Collection", "Container", "Hashable", "Sized", "Reversible", "AbstractSet", "KeysView", "ValuesView",
    "ItemsView", "IO", "TextIO", "BinaryIO", "Pattern", "Match", "NamedTuple", "TypedDict", "typing",
    "Enum", "IntEnum", "Flag", "IntFlag", "ABC", "ABCMeta", "Exception", "BaseException", "Path",
})

_ALIASES = {"List": "list", "Dict": "dict", "Set": "set", "Tuple": "tuple", "FrozenSet": "frozenset",
            "Type": "type", "Text": "str", "Optional": "Optional", "Union": "Union"}
UNSPECIFIC = frozenset({"Any", "object"})
BUILTIN_SCALARS = frozenset({"int", "str", "float", "bool", "bytes", "None", "complex"})


@dataclass(frozen=True)
class TypeShape:
    """A type as head + arguments: `dict[str, list[User]]` -> dict(str, list(User)); unions are
    `Union(members...)` with `Optional[X]` normalized to `Union(X, None)`."""

    head: str
    args: tuple[TypeShape, ...] = ()

    def members(self) -> tuple[TypeShape, ...]:
        return self.args if self.head == "Union" else (self,)

    def render(self) -> str:
        if not self.args:
            return self.head
        return f"{self.head}[{', '.join(a.render() for a in self.args)}]"


def parse_annotation(text: str) -> ast.expr | None:
    try:
        return ast.parse(text.strip(), mode="eval").body
    except (SyntaxError, ValueError):
        return None


def mentioned_names(node: ast.AST | None) -> list[str]:
    """Non-builtin type names an annotation mentions, in order of appearance, forward references
    (string annotations) included; dotted names give their last part."""
    names: list[str] = []
    for child in _walk_annotation(node):
        name = child.id if isinstance(child, ast.Name) else child.attr if isinstance(child, ast.Attribute) else None
        if name and name not in BUILTIN_TYPE_NAMES and name not in names:
            names.append(name)
    return names


def _walk_annotation(node: ast.AST | None):
    if node is None:
        return
    for child in ast.walk(node):
        if isinstance(child, ast.Constant) and isinstance(child.value, str):
            yield from _walk_annotation(parse_annotation(child.value))
        elif isinstance(child, (ast.Attribute, ast.Name)):
            yield child


def shape_of(node: ast.AST | None) -> TypeShape | None:
    """The normalized shape of an annotation, or None when it is not a type expression we understand."""
    if node is None:
        return None
    if isinstance(node, ast.Constant):
        if node.value is None:
            return TypeShape("None")
        return shape_of(parse_annotation(node.value)) if isinstance(node.value, str) else None
    if isinstance(node, ast.Name):
        return TypeShape(_ALIASES.get(node.id, node.id))
    if isinstance(node, ast.Attribute):
        return TypeShape(_ALIASES.get(node.attr, node.attr))
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _union([shape_of(node.left), shape_of(node.right)])
    if isinstance(node, ast.Subscript):
        return _subscript_shape(node)
    if isinstance(node, ast.List):  # the parameter list of Callable[[...], R]
        return TypeShape("params", tuple(s for s in map(shape_of, node.elts) if s is not None))
    return None


def _subscript_shape(node: ast.Subscript) -> TypeShape | None:
    base = shape_of(node.value)
    if base is None:
        return None
    elements = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
    args = [shape_of(e) for e in elements]
    if base.head == "Optional":
        return _union([args[0] if args else None, TypeShape("None")])
    if base.head == "Union":
        return _union(args)
    if base.head == "Annotated" and args and args[0] is not None:
        return args[0]
    return TypeShape(base.head, tuple(a if a is not None else TypeShape("Any") for a in args))


def _union(parts: list[TypeShape | None]) -> TypeShape | None:
    members: list[TypeShape] = []
    for part in parts:
        if part is None:
            return None
        for member in part.members():
            if member not in members:
                members.append(member)
    return members[0] if len(members) == 1 else TypeShape("Union", tuple(members))


def shape_from_text(text: str) -> TypeShape | None:
    return shape_of(parse_annotation(text)) if text else None
