"""Prompting and the generate module. One prompt shape for every flow so they differ only in which
documents they retrieve and when: a short chat instruction, the context documents, the question, and
the committed answer as the start of the assistant's turn."""

from __future__ import annotations

from longbow.rag.lm import LM, LMGeneration
from longbow.rag.modules.reader import reader_messages
from longbow.rag.modules.state import FlowState
from longbow.rag.types import Hit

# NOTE: SmolLM2-135M-Instruct follows short instructions best; longer ones ("cite", "think step by step")
# made it ramble. The answer is scored against a short phrase.
INSTRUCTION = "Answer with a short phrase."


def user_message(question: str, hits: list[Hit]) -> str:
    lines = [INSTRUCTION]
    if hits:
        lines.append("Context:")
        # NOTE: no "[1]" markers: SmolLM2-135M copied them into its answers ("[1] Lembesbor\n[2] ...")
        lines.extend(hit.chunk.text for hit in hits)
    lines.append(f"Question: {question}")
    return "\n".join(lines)


def phrase_messages(question: str, hits: list[Hit]) -> list[dict[str, str]]:
    return [{"role": "user", "content": user_message(question, hits)}]


# "phrase": one instruction turn (the default answer); "reader": few-shot turns that end in "So the answer
# is ..." (rag.modules.reader), for answers scored against a short gold phrase
PROMPTS = {"phrase": phrase_messages, "reader": reader_messages}


def build_prompt(lm: LM, question: str, hits: list[Hit], answer_so_far: str,
                 max_new_tokens: int, prompt: str = "phrase") -> list[int]:
    """Prompt ids; the oldest context documents are dropped until prompt + max_new_tokens fits the LM."""
    hits, messages = list(hits), PROMPTS[prompt]
    while True:
        ids = lm.chat(messages(question, hits))
        if answer_so_far:
            ids = ids + lm.tokenize(answer_so_far)
        if len(ids) + max_new_tokens <= lm.max_context or not hits:
            return ids
        hits = hits[1:]


def run_generation(state: FlowState, max_new_tokens: int, *, stream: bool = False,
                   return_attention: bool = False) -> tuple[list[int], LMGeneration]:
    """One LM call continuing the committed answer with the current context; counts it. When stream is
    set the text goes to on_text live (the caller then commits all of it)."""
    prompt = build_prompt(state.lm, state.question, state.hits, state.answer, max_new_tokens,
                          state.settings.prompt)
    on_text = state.settings.on_text if stream else None
    generation = state.lm.generate(prompt, max_tokens=max_new_tokens, return_attention=return_attention,
                                   on_text=on_text)
    state.usage.lm_calls += 1
    state.usage.generated_tokens += len(generation.token_ids)
    return prompt, generation


def generate(state: FlowState, max_tokens: int | None = None) -> None:
    """Generate up to max_tokens (default: what is left of the answer budget) and commit all of it,
    streaming live. Marks the flow finished at EOS/stop or when the budget is spent. No-op once finished."""
    if state.finished:
        return
    budget = min(max_tokens or state.tokens_left, state.tokens_left)
    _, generation = run_generation(state, budget, stream=True)
    state.commit(generation.text, len(generation.token_ids), stream=False)
    state.finished = generation.finish_reason != "length" or state.tokens_left == 0
    state.record("generate", text=generation.text, tokens=len(generation.token_ids),
                 finish_reason=generation.finish_reason, context=[h.chunk.chunk_id for h in state.hits])
