"""The reader prompt: few-shot chat turns that end every answer in "So the answer is <short answer>.", and
the extraction of that short answer from what the model wrote.

The examples reason in one sentence per hop and then name the answer (the chain-of-thought exemplars of
the DRAGIN paper, shortened for a 135M model). Writing the bridge entity before the answer is what lets
active retrieval see it: DRAGIN's trigger fires on the guessed bridge or answer, and its query can hold
the bridge once the model has written it. The examples use invented names that the synthetic corpus
(rag.eval.synthetic) does not produce, and a short context, so the model also learns to copy from it.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

from longbow.rag.types import Hit

ANSWER_CUE = "So the answer is"


@dataclass(frozen=True)
class Example:
    context: tuple[str, ...]
    question: str
    answer: str  # the reasoning and the cue sentence


# NOTE: in-domain exemplars (the paper writes dataset-specific ones too): two two-hop questions and one
# single-hop question in the corpus's phrasing (three, not more: every flow call prefills them, with no
# prefix cache on CPU), with names no NameMaker seed produces (each holds a "q", a letter it never uses).
EXAMPLES = (
    Example(("Qexlo Forge is a glassware company. Qexlo Forge was founded in 1931 by Ammi Taqex.",
             "Ammi Taqex is a poet known for a cycle of winter songs. "
             "Ammi Taqex was born in Dorquex in 1899."),
            "In which city was the founder of Qexlo Forge born?",
            "Qexlo Forge was founded by Ammi Taqex. Ammi Taqex was born in Dorquex. "
            "So the answer is Dorquex."),
    Example(("Quxa Wend is a city in the region of Velquax. The river Taxq flows through Quxa Wend.",),
            "Which river flows through Quxa Wend?",
            "The river Taxq flows through Quxa Wend. So the answer is Taxq."),
    Example(("The headquarters of Orqux Press are in Linqax.", "Linqax is a city in the region of Barquex."),
            "In which region is the city where Orqux Press has its headquarters?",
            "The headquarters of Orqux Press are in Linqax. Linqax is in the region of Barquex. "
            "So the answer is Barquex."),
)

INSTRUCTION = f"Answer from the context. End with \"{ANSWER_CUE} ...\"."


def _user_turn(question: str, context: list[str]) -> str:
    lines = [INSTRUCTION]
    if context:
        lines.append("Context:")
        lines.extend(context)
    lines.append(f"Question: {question}")
    return "\n".join(lines)


def reader_messages(question: str, hits: list[Hit]) -> list[dict[str, str]]:
    """The few-shot turns (user: context and question, assistant: reasoning and cue), then the question
    with the retrieved documents."""
    messages = []
    for example in EXAMPLES:
        messages.append({"role": "user", "content": _user_turn(example.question, list(example.context))})
        messages.append({"role": "assistant", "content": example.answer})
    messages.append({"role": "user", "content": _user_turn(question, [hit.chunk.text for hit in hits])})
    return messages


# --- answer extraction ----------------------------------------------------------------------------------

_CUE = re.compile(r"\b(?:so\s+)?the\s+answer\s+is\s*:?", re.I)
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)|\n")
_WRAPPING = string.punctuation.replace("'", "") + "“”‘’" + string.whitespace
_LEADING = re.compile(r"^(?:(?:the|a|an|in|at|on|of|by|from|called|named)\s+)+", re.I)


def extract_answer(text: str) -> str:
    """The short answer in a reader's output:
    1. the span after the first "the answer is" (the cue the few-shot turns end with), up to its sentence
       end (the first: a 135M model sometimes repeats the cue with a new guess after it);
    2. without a cue (cut off, or the model did not follow the format): the last complete sentence, or
       the text itself when no sentence ended;
    3. wrapping quotes, brackets, markdown and trailing punctuation stripped, then leading articles and
       prepositions ("the", "in", ...), which a short answer never starts with in this corpus.
    Empty text gives ""."""
    cue = _CUE.search(text)
    if cue:
        span = text[cue.end():]
        end = _SENTENCE_END.search(span)
        span = span[:end.start()] if end else span
    else:
        span = _last_sentence(text)
    return _LEADING.sub("", span.strip(_WRAPPING)).strip(_WRAPPING)


def _last_sentence(text: str) -> str:
    """The last sentence that ends with . ! ? or a newline; the whole text when none does."""
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    if not ends:
        return text
    sentences = [text[start:end] for start, end in zip([0, *ends], ends)]
    complete = [s for s in sentences if s.strip(_WRAPPING)]
    return complete[-1] if complete else text
