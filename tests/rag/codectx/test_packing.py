"""Budget packing: order, budget respected, deterministic, locations present."""

from __future__ import annotations

from longbow.rag.codectx.packing import approximate_tokens, pack_context
from longbow.rag.codectx.records import ContextItem, ExpectedType
from longbow.rag.codectx.service import build_context

from .workspaces import MODELS


def _items(kind: str, sizes: list[int]) -> list[ContextItem]:
    return [ContextItem(kind, f"{kind}{i}", "x" * size, f"{kind}.py", i + 1) for i, size in enumerate(sizes)]


def test_type_definitions_first_then_headers_then_bindings():
    packed = pack_context(ExpectedType("User", "return"), _items("type_definition", [10, 10]), _items("header", [10]),
                          [ContextItem("binding", "n", "", "u.py", 1, "int")], 1000, approximate_tokens)
    assert [i.kind for i in packed.items] == ["type_definition", "type_definition", "header", "binding"]
    assert packed.text.startswith("# expected type of the hole: User\n# type_definition.py:1\n")


def test_budget_is_respected_and_smaller_items_fill_gaps():
    packed = pack_context(ExpectedType(), _items("type_definition", [40, 400, 40]), [], [], 60, approximate_tokens)
    assert [i.name for i in packed.items] == ["type_definition0", "type_definition2"]
    assert packed.tokens == approximate_tokens(packed.text) or packed.tokens <= 60


def test_whole_context_is_deterministic_and_within_budget(workspace):
    hole = workspace({"app/models.py": MODELS, "app/use.py": """
        from app.models import User, Role
        def make(name: str) -> User: ...
        def f(r: Role) -> User:
            return <|>
        """})
    contexts = [build_context(str(hole.root), hole.path, hole.line, hole.column, token_budget=budget)
                for budget in (80, 80, 400)]
    assert contexts[0].packed_text == contexts[1].packed_text
    assert contexts[0].packed_tokens <= 80 < contexts[2].packed_tokens <= 400
    assert approximate_tokens(contexts[2].packed_text) <= 400
    assert "# app/models.py:" in contexts[2].packed_text and "class User" in contexts[2].packed_text
    assert contexts[2].packed_items[0].name == "User"
