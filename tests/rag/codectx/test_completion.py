"""Completion with error rounds: a scripted LM pins down the loop; one run on the real model."""

from __future__ import annotations

from longbow.rag.codectx.completion import clean_fill
from longbow.rag.codectx.service import CodeContextService, HoleRequest
from longbow.rag.lm import LM, LMGeneration

from .workspaces import MODELS

USE = """
    from app.models import User, Role
    def make(name: str) -> User: ...
    def f(name: str) -> User:
        return <|>
    """


class ScriptedLM(LM):
    """Replies from a script, one per generate(); records the chats it was asked."""

    max_context = 4096

    def __init__(self, replies: list[str]):
        self.replies, self.chats = list(replies), []

    def tokenize(self, text):
        return list(range(len(text) // 4))

    def tokenize_with_offsets(self, text):
        raise NotImplementedError

    def detokenize(self, token_ids):
        return ""

    def chat(self, messages):
        self.chats.append([dict(m) for m in messages])
        return list(range(sum(len(m["content"]) for m in messages) // 4))

    def token_logprobs(self, token_ids):
        return []

    def generate(self, prompt_ids, *, max_tokens, stop=None, temperature=0.0, return_attention=False, on_text=None):
        return LMGeneration([], self.replies.pop(0), finish_reason="stop")


def _request(workspace):
    hole = workspace({"app/models.py": MODELS, "app/use.py": USE})
    return HoleRequest(str(hole.root), hole.path, hole.line, hole.column, token_budget=512)


def test_errors_are_fed_back_until_the_fill_checks(workspace, disk_roots):
    lm = ScriptedLM(["```python\nreturn name\n```", "make(name)"])
    completion = CodeContextService(readable_roots=disk_roots).complete(lm, _request(workspace), error_rounds=2)
    assert (completion.fill, completion.diagnostics, completion.rounds_used) == ("make(name)", [], 1)
    first_prompt = lm.chats[0][1]["content"]
    assert "class User" in first_prompt and "<HOLE>" in first_prompt and "must have type: User" in first_prompt
    assert "Incompatible return value type" in lm.chats[-1][-1]["content"]


def test_rounds_are_capped_at_two_and_last_diagnostics_returned(workspace, disk_roots):
    lm = ScriptedLM(["1", "2", "3", "4"])
    completion = CodeContextService(readable_roots=disk_roots).complete(lm, _request(workspace), error_rounds=5)
    assert completion.rounds_used == 2 and completion.fill == "3" and len(completion.diagnostics) == 1
    assert len(lm.replies) == 1


def test_code_window_is_cut_to_fit_the_model_context(workspace, disk_roots):
    filler = "".join(f"    line_{i} = {i}\n" for i in range(200))
    hole = workspace({"app/models.py": MODELS, "app/use.py": f"from app.models import User\ndef f() -> User:\n{filler}    return <|>\n"})
    lm = ScriptedLM(["x"])
    lm.max_context = 700
    request = HoleRequest(str(hole.root), hole.path, hole.line, hole.column, token_budget=512)
    CodeContextService(readable_roots=disk_roots).complete(lm, request, error_rounds=0, max_tokens=16)
    prompt = lm.chats[-1]
    assert len(lm.chat(prompt)) <= 700 - 16 - 175 and "line_199 = 199" in prompt[1]["content"]
    assert "line_160 = 160" not in prompt[1]["content"]


def test_no_error_rounds_means_no_check(workspace, disk_roots):
    service = CodeContextService(readable_roots=disk_roots)
    completion = service.complete(ScriptedLM(["name"]), _request(workspace), error_rounds=0)
    assert (completion.fill, completion.diagnostics, completion.rounds_used) == ("name", [], 0)


def test_clean_fill():
    assert clean_fill("Sure:\n```python\nreturn make(x)\n```\nDone", "    return ") == "make(x)"
    assert clean_fill("a\nb", "") == "a\nb"
    assert clean_fill("x + 1\nmore", "    y = ") == "x + 1"


def test_real_model_completion_reports_its_own_diagnostics(workspace, engine_lm, disk_roots):
    service = CodeContextService(count_tokens=lambda text: len(engine_lm.tokenize(text)), readable_roots=disk_roots)
    request = _request(workspace)
    # NOTE: 4 tokens: decoding on this shared CPU runs at seconds per token; the loop itself is pinned above.
    completion = service.complete(engine_lm, request, error_rounds=1, max_tokens=4)
    assert 0 <= completion.rounds_used <= 1 and completion.context.packed_tokens > 0
    assert completion.diagnostics == service.check(request, completion.fill)
