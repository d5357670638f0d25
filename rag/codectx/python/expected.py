"""The expected type of a Python hole, from the nearest enclosing context that fixes one:

- `return <hole>`                -> the enclosing function's return annotation
- a hole that is a whole function body -> the return annotation too ("body")
- `x: T = <hole>`                -> T
- `x = <hole>` / `self.x = <hole>` where x was declared with a type -> that type
- `f(a, <hole>)`, `f(k=<hole>)`  -> the parameter's annotation (functions, methods, class constructors)
- `def f(x: T = <hole>)`         -> T
- `a == <hole>`, `a + <hole>`    -> the other operand's type
Containers unwrap on the way: an element of `[..., <hole>]` whose list is expected as list[T] gets T.
"""

from __future__ import annotations

import ast

from longbow.rag.codectx.python.definitions import Definition
from longbow.rag.codectx.python.scope import ScopeResolver
from longbow.rag.codectx.records import ExpectedType

_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)


_TRANSPARENT = (ast.IfExp, ast.BoolOp, ast.keyword, ast.Await, ast.Starred, ast.NamedExpr)


def expected_type(resolver: ScopeResolver) -> ExpectedType:
    node: ast.AST = resolver.parsed.hole
    element_path: list[int] = []  # positions inside container literals between the hole and its context
    for parent in resolver.parsed.ancestors():
        found = _context_rule(parent, node, resolver)
        if found is not None:
            return _unwrap(found, element_path)
        if isinstance(parent, (ast.List, ast.Set, ast.Tuple)):
            element_path.append(parent.elts.index(node) if node in parent.elts else 0)
        elif not isinstance(parent, _TRANSPARENT):
            return ExpectedType()  # a statement or expression no rule covers: the type is not fixed
        node = parent
    return ExpectedType()


def _context_rule(parent: ast.AST, node: ast.AST, resolver: ScopeResolver) -> ExpectedType | None:
    if isinstance(parent, ast.Return) and parent.value is node:
        return _return_type(resolver)
    if isinstance(parent, ast.Expr) and parent.value is node and _is_whole_body(parent, resolver):
        found = _return_type(resolver)
        return ExpectedType(found.text, "body")
    if isinstance(parent, ast.AnnAssign) and parent.value is node:
        return ExpectedType(ast.unparse(parent.annotation), "annotated_assignment")
    if isinstance(parent, ast.Assign) and parent.value is node:
        return _declared_target_type(parent.targets[-1], resolver)
    if isinstance(parent, ast.Call) and parent.func is not node:
        return _argument_type(parent, node, resolver)
    if isinstance(parent, ast.arguments):
        return _default_type(parent, node)
    if isinstance(parent, ast.Compare):
        if any(isinstance(op, (ast.In, ast.NotIn)) for op in parent.ops):
            return ExpectedType("", "comparison")  # membership: the other side is a container or element
        other = parent.left if node is not parent.left else parent.comparators[0]
        return _other_operand(other, "comparison", resolver)
    if isinstance(parent, ast.BinOp):
        other = parent.left if node is parent.right else parent.right
        return _other_operand(other, "operator", resolver)
    return None


def _is_whole_body(statement: ast.Expr, resolver: ScopeResolver) -> bool:
    """A hole that is the only statement of a function body (after its docstring) stands for the body:
    what it must produce is the function's return type."""
    function = resolver.parsed.parents.get(statement)
    if not isinstance(function, _FUNCTIONS):
        return False
    body = function.body[1:] if ast.get_docstring(function) is not None else function.body
    return body == [statement]


def _return_type(resolver: ScopeResolver) -> ExpectedType:
    function = next((f for f in resolver.functions if isinstance(f, _FUNCTIONS)), None)
    if function is None or function.returns is None:
        return ExpectedType("", "return")
    return ExpectedType(ast.unparse(function.returns), "return")


def _declared_target_type(target: ast.expr, resolver: ScopeResolver) -> ExpectedType:
    if isinstance(target, ast.Name):
        return ExpectedType(_declared_name_type(target.id, resolver), "declaration")
    if isinstance(target, ast.Attribute):
        return ExpectedType(resolver.type_of(target), "declaration")
    return ExpectedType("", "declaration")


def _declared_name_type(name: str, resolver: ScopeResolver) -> str:
    """The annotation a name was declared with (`x: T` earlier), never a type inferred from a value."""
    for node in ast.walk(resolver.functions[0] if resolver.functions else resolver.parsed.tree):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
            return ast.unparse(node.annotation)
        if isinstance(node, ast.arg) and node.arg == name and node.annotation is not None:
            return ast.unparse(node.annotation)
    return ""


def _argument_type(call: ast.Call, node: ast.AST, resolver: ScopeResolver) -> ExpectedType:
    callee = resolver.callee(call.func)
    params = _callee_params(callee, resolver) if callee is not None else []
    if isinstance(node, ast.keyword):
        annotation = dict(params).get(node.arg or "", "")
    elif node in call.args and not any(isinstance(a, ast.Starred) for a in call.args):
        position = call.args.index(node)
        annotation = params[position][1] if position < len(params) and not params[position][0].startswith("*") else ""
    else:
        annotation = ""
    return ExpectedType(annotation, "call_argument")


def _callee_params(callee: Definition, resolver: ScopeResolver) -> list[tuple[str, str]]:
    if not callee.is_type:
        return list(callee.params)
    init = resolver.index.methods_of(callee.name).get("__init__")
    if init is not None and init.path == callee.path:
        return list(init.params)
    return list(callee.fields)  # dataclasses, NamedTuples, TypedDicts: fields in order


def _default_type(arguments: ast.arguments, node: ast.AST) -> ExpectedType | None:
    positional = [*arguments.posonlyargs, *arguments.args]
    pairs = list(zip(positional[len(positional) - len(arguments.defaults):], arguments.defaults))
    pairs += [(a, d) for a, d in zip(arguments.kwonlyargs, arguments.kw_defaults) if d is not None]
    for arg, default in pairs:
        if default is node:
            return ExpectedType(ast.unparse(arg.annotation) if arg.annotation else "", "default")
    return None


def _other_operand(other: ast.AST, source: str, resolver: ScopeResolver) -> ExpectedType:
    type_text = resolver.type_of(other)
    return ExpectedType("" if type_text.startswith("type[") else type_text, source)


def _unwrap(found: ExpectedType, element_path: list[int]) -> ExpectedType:
    text = found.text
    for position in reversed(element_path):
        text = _element_of(text, position)
    return ExpectedType(text, found.source)


def _element_of(type_text: str, position: int) -> str:
    try:
        node = ast.parse(type_text, mode="eval").body
    except SyntaxError:
        return ""
    if not isinstance(node, ast.Subscript):
        return ""
    head = ast.unparse(node.value).split(".")[-1].lower()
    elements = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
    if head == "tuple":
        return ast.unparse(elements[position]) if position < len(elements) else ""
    if head in ("list", "set", "sequence", "iterable", "frozenset", "collection"):
        return ast.unparse(elements[0])
    return ""
