"""Filling a hole with the model, with error rounds: generate a fill from the packed context and the
code around the hole, type-check it, and while the checker complains (at most `error_rounds` times, and
never more than MAX_ERROR_ROUNDS) show the model its fill and the diagnostics and ask again."""

from __future__ import annotations

import re

from longbow.rag.codectx.records import CodeContext, Completion, Diagnostic
from longbow.rag.lm import LM

MAX_ERROR_ROUNDS = 2
WINDOW_LINES_BEFORE = 40
WINDOW_LINES_AFTER = 10
HOLE_MARKER = "<HOLE>"
_FENCE = re.compile(r"```[\w+-]*\n?(.*?)(?:```|$)", re.DOTALL)
_SYSTEM = ("You complete code. Reply with only the code that replaces " + HOLE_MARKER + ", no explanation.")


def complete_hole(service, lm: LM, request, *, error_rounds: int, max_tokens: int, temperature: float) -> Completion:
    rounds_allowed = max(0, min(error_rounds, MAX_ERROR_ROUNDS))
    budget = max(0, min(request.token_budget, (lm.max_context - max_tokens) // 2))
    context = service.context(_with_budget(request, budget))
    source = service.source(request)
    before, after = _around_hole(source, request.line, request.column)
    messages = _fitting_messages(lm, context, before, after, max_tokens)
    fill = _generate(lm, messages, max_tokens, temperature, before)
    diagnostics: list[Diagnostic] = service.check(request, fill) if rounds_allowed else []
    rounds = 0
    while diagnostics and rounds < rounds_allowed:
        rounds += 1
        messages += [{"role": "assistant", "content": fill},
                     {"role": "user", "content": _error_prompt(diagnostics)}]
        fill = _generate(lm, messages, max_tokens, temperature, before)
        diagnostics = service.check(request, fill)
    return Completion(fill, diagnostics, rounds, context)


def _with_budget(request, budget: int):
    from dataclasses import replace

    return replace(request, token_budget=budget)


def _around_hole(source: str, line: int, column: int) -> tuple[str, str]:
    lines = source.split("\n")
    current = lines[line - 1] if 0 < line <= len(lines) else ""
    before = "\n".join([*lines[max(0, line - 1 - WINDOW_LINES_BEFORE): line - 1], current[: column - 1]])
    after = "\n".join([current[column - 1:], *lines[line: line + WINDOW_LINES_AFTER]])
    return before, after


def _fitting_messages(lm: LM, context: CodeContext, before: str, after: str, max_tokens: int) -> list[dict]:
    """The first chat, with the code window cut from the top until the prompt leaves room to generate
    (error rounds add about one fill and a few diagnostics: a quarter of the room is kept for them)."""
    room = lm.max_context - max_tokens - lm.max_context // 4
    while True:
        messages = [{"role": "system", "content": _SYSTEM},
                    {"role": "user", "content": _first_prompt(context, before, after)}]
        if len(lm.chat(messages)) <= room or "\n" not in before:
            return messages
        lines = before.split("\n")
        before = "\n".join(lines[len(lines) // 2 + (len(lines) == 2):])


def _first_prompt(context: CodeContext, before: str, after: str) -> str:
    parts = []
    if context.packed_text:
        parts.append(f"Relevant definitions:\n```\n{context.packed_text}```")
    if context.expected_type.text:
        parts.append(f"The hole must have type: {context.expected_type.text}")
    parts.append(f"Code:\n```\n{before}{HOLE_MARKER}{after}\n```\nWrite the code for {HOLE_MARKER}.")
    return "\n\n".join(parts)


def _error_prompt(diagnostics: list[Diagnostic]) -> str:
    listed = "\n".join(f"line {d.line}:{d.column}: {d.message}" for d in diagnostics[:10])
    return f"The type checker reports:\n{listed}\nFix it. Reply with only the code for {HOLE_MARKER}."


def _generate(lm: LM, messages: list[dict[str, str]], max_tokens: int, temperature: float, before: str) -> str:
    prompt = lm.chat(messages)
    generation = lm.generate(prompt, max_tokens=max_tokens, temperature=temperature)
    return clean_fill(generation.text, before.rsplit("\n", 1)[-1])


def clean_fill(text: str, line_before: str) -> str:
    """The code of a model reply: the fenced block if there is one; one line when the hole is inside a
    line; without a repeat of what precedes the hole on its line."""
    fenced = _FENCE.search(text)
    code = (fenced.group(1) if fenced else text).strip("\n").rstrip()
    typed = line_before.strip()
    if typed and code.lstrip().startswith(typed):
        code = code.lstrip()[len(typed):].lstrip()
    if typed:
        code = code.strip().split("\n", 1)[0] if code.strip() else ""
    return code.replace(HOLE_MARKER, "")
