"""Modular RAG flows as data, and the small interpreter that runs them.

A flow is a tree of five node kinds: `Step` (call one module), `Sequence` (linear), `Conditional` (a
router picks a branch), `Branching` (branches run on copies of the state, their hit lists are merged by
one step) and `Loop` (repeat a body until a judge says "done", at most max_rounds times). Modules
(rag.modules, rag.dragin) read and write one `FlowState`; routers and judges return a string. The named
flows below are the baselines and DRAGIN; `run_flow` runs one by name.

Streaming: on_text receives only committed text, so the deltas always concatenate to the final answer.
Single-round flows stream the generation live; fixed-interval streams each interval live (intervals are
never taken back); FLARE streams a sentence when it commits it; DRAGIN streams the kept part of each
round when the round ends (the part after the trigger is thrown away, so it cannot be streamed earlier).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Union

from longbow.rag import dragin
from longbow.rag.lm import LM
from longbow.rag.modules import flare, generation, query, retrieval
from longbow.rag.modules.generation import PROMPTS
from longbow.rag.modules.reader import extract_answer
from longbow.rag.modules.state import FlowSettings, FlowState, TraceEvent
from longbow.rag.types import Hit, Retriever


@dataclass(frozen=True)
class Step:
    module: str
    options: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Sequence:
    steps: tuple[Node, ...]


@dataclass(frozen=True)
class Conditional:
    route: Step  # a decision: returns the key of the branch to run
    branches: Mapping[str, Node]


@dataclass(frozen=True)
class Branching:
    branches: tuple[Node, ...]
    merge: Step = Step("fuse")


@dataclass(frozen=True)
class Loop:
    body: Node
    until: Step  # a decision: "done" ends the loop
    max_rounds: int


Node = Union[Step, Sequence, Conditional, Branching, Loop]


@dataclass
class FlowResult:
    """answer: the committed text (what on_text received); hits: the documents in the final prompt;
    rounds: retrieval rounds run; counters for benchmarks; trace: every step's record."""

    answer: str
    hits: list[Hit]
    rounds: int
    trace: list[TraceEvent]
    retrievals: int = 0
    lm_calls: int = 0
    generated_tokens: int = 0
    short_answer: str = ""  # the reader prompt's extracted answer; the stripped answer otherwise


# --- decisions (routers and loop judges) ----------------------------------------------------------------

_MULTI_HOP = re.compile(r"\bthe \w+ (of|where|whose|who)\b", re.I)


def route_by_query(state: FlowState) -> str:
    """"multi_hop" when the question reaches an entity through another ("the founder of X"), "lookup" when
    it names something (a capitalised word after the first, or a number), else "general"."""
    if _MULTI_HOP.search(state.question):
        return "multi_hop"
    names = [w for w in state.question.split()[1:] if w[:1].isupper() or w[:1].isdigit()]
    return "lookup" if names else "general"


def finished(state: FlowState) -> str:
    return "done" if state.finished else "continue"


def last_decision(state: FlowState) -> str:
    return state.decision


MODULES: dict[str, Callable[..., None]] = {
    "rewrite": query.rewrite,
    "retrieve": retrieval.retrieve,
    "fuse": retrieval.fuse,
    "rerank": retrieval.rerank,
    "generate": generation.generate,
    "lookahead": flare.lookahead,
    "commit": flare.commit_pending,
    "dragin_round": dragin.dragin_round,
}
DECISIONS: dict[str, Callable[..., str]] = {
    "route_by_query": route_by_query,
    "confidence": flare.confidence,
    "finished": finished,
    "last_decision": last_decision,
}


# --- the interpreter ------------------------------------------------------------------------------------

def execute(node: Node, state: FlowState) -> None:
    if isinstance(node, Step):
        MODULES[node.module](state, **node.options)
    elif isinstance(node, Sequence):
        for step in node.steps:
            execute(step, state)
    elif isinstance(node, Conditional):
        _execute_conditional(node, state)
    elif isinstance(node, Branching):
        _execute_branching(node, state)
    elif isinstance(node, Loop):
        _execute_loop(node, state)
    else:
        raise TypeError(f"not a flow node: {node!r}")


def decide(step: Step, state: FlowState) -> str:
    state.decision = DECISIONS[step.module](state, **step.options)
    return state.decision


def _execute_conditional(node: Conditional, state: FlowState) -> None:
    route = decide(node.route, state)
    state.record("route", decision=node.route.module, route=route)
    if route not in node.branches:
        raise ValueError(f"router {node.route.module} chose {route!r}; branches: {sorted(node.branches)}")
    execute(node.branches[route], state)


def _execute_branching(node: Branching, state: FlowState) -> None:
    # NOTE: branches run one after another: EngineLM is not thread-safe, and each branch sees its own copy
    # of the state (queries, retrieved), sharing counters and trace, so running them in a pool changes
    # nothing else.
    forks = [dataclasses.replace(state, queries=[], retrieved=[]) for _ in node.branches]
    for branch, fork in zip(node.branches, forks):
        execute(branch, fork)
    state.queries = [q for fork in forks for q in fork.queries]
    state.retrieved = [hits for fork in forks for hits in fork.retrieved]
    execute(node.merge, state)


def _execute_loop(node: Loop, state: FlowState) -> None:
    for round_number in range(1, node.max_rounds + 1):
        execute(node.body, state)
        if decide(node.until, state) == "done":
            state.record("loop", rounds=round_number, stopped="done")
            return
    state.record("loop", rounds=node.max_rounds, stopped="max_rounds")


# --- the named flows ------------------------------------------------------------------------------------

def _retrieve_with(mode: str) -> Sequence:
    return Sequence((Step("rewrite", {"mode": mode}), Step("retrieve"), Step("fuse")))


def no_retrieval_flow() -> Node:
    return Step("generate")


def single_retrieval_flow() -> Node:
    return Sequence((_retrieve_with("question"), Step("generate")))


def fixed_interval_flow(interval: int = 16, max_rounds: int = 8) -> Node:
    """Retrieve with the question, then every `interval` tokens with question + answer so far."""
    body = Sequence((Step("generate", {"max_tokens": interval}),
                     Conditional(Step("finished"),
                                 {"done": Sequence(()), "continue": _retrieve_with("generated")})))
    return Sequence((_retrieve_with("question"), Loop(body, Step("finished"), max_rounds)))


def flare_flow(threshold: float = 0.4, lookahead_tokens: int = 32, max_rounds: int = 6) -> Node:
    """FLARE-direct: initial retrieval with the question; per sentence, look ahead; if a token is below
    threshold, retrieve with the sentence minus those tokens and regenerate it; commit."""
    options = {"tokens": lookahead_tokens, "threshold": threshold}
    low = Sequence((_retrieve_with("pending"), Step("lookahead", options)))
    body = Sequence((Step("lookahead", options),
                     Conditional(Step("confidence", {"threshold": threshold}),
                                 {"low": low, "high": Sequence(())}),
                     Step("commit")))
    return Sequence((_retrieve_with("question"), Loop(body, Step("finished"), max_rounds)))


def dragin_flow(theta: float = 0.6, top_n: int = 4, max_retrieval_rounds: int = 3,
                initial_retrieval: bool = True, query_attention: str = "later") -> Node:
    """DRAGIN as a loop: generate with attention; on a RIND trigger retrieve with the QFS query and resume.

    NOTE: initial_retrieval (default on) retrieves with the question first, as FLARE does, and deviates
    from the paper (which retrieves only on a trigger): with no documents SmolLM2-135M invents an
    answer about an invented entity, and the first trigger then spends a round fetching what the question
    alone finds. max_retrieval_rounds counts that first retrieval.

    NOTE: query_attention "later" (default) builds the QFS query from the attention of the trigger and
    the tokens after it, over the round's whole text; "trigger" is the paper's (the trigger token's
    attention, words before it). On bench/rag_qa.py (seed 0, 24 two-hop questions) "later" put both gold
    documents in the prompt for 11 of 24 questions against 5 for "trigger": SmolLM2 usually fires in
    its first sentence, before it has written the bridge, so "trigger" mostly had the question's words."""
    round_options = {"theta": theta, "top_n": top_n, "max_retrieval_rounds": max_retrieval_rounds,
                     "query_attention": query_attention}
    body = Sequence((Step("dragin_round", round_options),
                     Conditional(Step("last_decision"),
                                 {"retrieve": Sequence((Step("retrieve"), Step("fuse"))),
                                  "done": Sequence(())})))
    loop = Loop(body, Step("finished"), max_retrieval_rounds + 1)
    return Sequence((_retrieve_with("question"), loop)) if initial_retrieval else loop


def multi_query_flow() -> Node:
    """Branching: the question and its keywords retrieve in parallel, fused by RRF, reranked, answered."""
    branches = (Sequence((Step("rewrite", {"mode": "question"}), Step("retrieve"))),
                Sequence((Step("rewrite", {"mode": "keywords"}), Step("retrieve"))))
    return Sequence((Branching(branches, Step("fuse")), Step("rerank"), Step("generate")))


def routed_flow() -> Node:
    """Conditional: general questions get no retrieval, lookups one, multi-hop questions DRAGIN."""
    return Conditional(Step("route_by_query"), {"general": no_retrieval_flow(),
                                                "lookup": single_retrieval_flow(),
                                                "multi_hop": dragin_flow()})


FLOWS: dict[str, Callable[..., Node]] = {
    "none": no_retrieval_flow,
    "single": single_retrieval_flow,
    "fixed_interval": fixed_interval_flow,
    "flare": flare_flow,
    "dragin": dragin_flow,
    "multi_query": multi_query_flow,
    "routed": routed_flow,
}


def build_flow(name: str, **options) -> Node:
    """The named flow; options go to its builder (e.g. theta for dragin). Unknown name -> ValueError."""
    if name not in FLOWS:
        raise ValueError(f"unknown flow {name!r}; valid flows: {', '.join(FLOWS)}")
    return FLOWS[name](**options)


def execute_flow(flow: Node, question: str, retriever: Retriever, lm: LM, *, top_k: int = 5,
                 filters: dict | None = None, max_tokens: int = 128,
                 on_text: Callable[[str], None] | None = None, prompt: str = "phrase") -> FlowResult:
    """Run flow. prompt: "phrase" (one instruction turn) or "reader" (few-shot turns ending in "So the
    answer is ..."; FlowResult.short_answer then holds the extracted answer). Unknown prompt -> ValueError."""
    if prompt not in PROMPTS:
        raise ValueError(f"unknown prompt {prompt!r}; valid prompts: {', '.join(PROMPTS)}")
    # NOTE: room for three rounds of top_k documents: with 2 * top_k, DRAGIN's third round pushed the first
    # hop's documents out of the prompt (bench/rag_qa.py, first run: gold documents in context fell to 0)
    settings = FlowSettings(top_k=top_k, filters=filters, max_tokens=max_tokens, on_text=on_text,
                            max_context_hits=3 * top_k, prompt=prompt)
    state = FlowState(question, retriever, lm, settings)
    execute(flow, state)
    usage = state.usage
    short = extract_answer(state.answer) if prompt == "reader" else state.answer.strip()
    return FlowResult(state.answer, list(state.hits), usage.retrieval_rounds, state.trace, usage.retrievals,
                      usage.lm_calls, usage.generated_tokens, short)


def run_flow(name: str, question: str, retriever: Retriever, lm: LM, *, top_k: int = 5,
             filters: dict | None = None, max_tokens: int = 128,
             on_text: Callable[[str], None] | None = None, prompt: str = "phrase") -> FlowResult:
    """Answer question with the named flow: none, single, fixed_interval, flare, dragin (and the
    multi_query / routed compositions) and the prompt shape (see execute_flow). Raises ValueError for an
    unknown name or prompt."""
    return execute_flow(build_flow(name), question, retriever, lm, top_k=top_k, filters=filters,
                        max_tokens=max_tokens, on_text=on_text, prompt=prompt)
