"""The flow interpreter and the baseline flows on fakes (tests/rag/test_flows_fakes.py): linear,
conditional, branching and loop flows; FLARE's low-probability trigger; streaming equals the answer."""

import math

import pytest

from longbow.rag.flows import (FLOWS, Branching, Conditional, Loop, Sequence, Step, build_flow, execute_flow,
                        route_by_query, run_flow)
from longbow.rag.modules.retrieval import reciprocal_rank_fusion_hits
from longbow.rag.modules.state import FlowSettings, FlowState
from longbow.rag.types import Document
from tests.rag.test_flows_fakes import KeywordRetriever, Reply, WordLM

DOCUMENTS = [
    Document("org", "Brenvik Labs was founded in 1950 by Tala Quon.", {"kind": "organisation"}),
    Document("person", "Tala Quon was born in Ostrik.", {"kind": "person"}),
    Document("city", "Ostrik is a city in the region of Velmoria.", {"kind": "city"}),
    Document("other", "Morro Press is a publishing company.", {"kind": "organisation"}),
]


def context_echo(prompt: str, call: int) -> Reply:
    """Answers from what the prompt's context holds: a reader that cannot know anything else."""
    if "born in Ostrik" in prompt:
        return Reply("Ostrik.")
    if "by Tala Quon" in prompt:
        return Reply("Tala Quon.")
    return Reply("I do not know.")


def steps(result):
    return [event.step for event in result.trace]


def test_unknown_flow_lists_the_valid_ones():
    with pytest.raises(ValueError) as error:
        run_flow("magic", "q", KeywordRetriever(DOCUMENTS), WordLM(context_echo))
    for name in ("none", "single", "fixed_interval", "flare", "dragin"):
        assert name in str(error.value)
    assert {"none", "single", "fixed_interval", "flare", "dragin"} <= set(FLOWS)


def test_no_retrieval_never_calls_the_retriever():
    retriever, lm = KeywordRetriever(DOCUMENTS), WordLM(context_echo)
    result = run_flow("none", "Who founded Brenvik Labs?", retriever, lm)
    assert result.answer == "I do not know." and result.rounds == 0 and result.hits == []
    assert retriever.queries == [] and result.lm_calls == 1


def test_single_retrieval_is_linear_rewrite_retrieve_fuse_generate():
    retriever, lm = KeywordRetriever(DOCUMENTS), WordLM(context_echo)
    result = run_flow("single", "Who founded Brenvik Labs?", retriever, lm, top_k=1)
    assert steps(result) == ["rewrite", "retrieve", "fuse", "generate"]
    assert result.answer == "Tala Quon." and result.rounds == 1 and result.retrievals == 1
    assert [h.chunk.chunk_id for h in result.hits] == ["org"]
    assert retriever.queries == ["Who founded Brenvik Labs?"]
    assert "Brenvik Labs was founded" in lm.calls[0].prompt


def test_filters_reach_the_retriever():
    retriever = KeywordRetriever(DOCUMENTS)
    result = run_flow("single", "Brenvik Labs Morro Press company", retriever, WordLM(context_echo),
                      filters={"kind": "organisation"})
    assert {h.chunk.metadata["kind"] for h in result.hits} == {"organisation"}


def test_conditional_routes_by_query():
    assert route_by_query(_state("What is love?")) == "general"
    assert route_by_query(_state("Who founded Brenvik Labs?")) == "lookup"
    assert route_by_query(_state("In which city was the founder of Brenvik Labs born?")) == "multi_hop"
    retriever = KeywordRetriever(DOCUMENTS)
    general = run_flow("routed", "What is love?", retriever, WordLM(context_echo))
    assert general.rounds == 0 and retriever.queries == []
    lookup = run_flow("routed", "Who founded Brenvik Labs?", retriever, WordLM(context_echo))
    routes = [e.detail["route"] for e in lookup.trace if e.step == "route"]
    assert routes == ["lookup"] and lookup.rounds == 1 and lookup.answer == "Tala Quon."


def test_conditional_with_an_unknown_route_fails_loudly():
    flow = Conditional(Step("route_by_query"), {"general": Step("generate")})
    with pytest.raises(ValueError, match="lookup"):
        execute_flow(flow, "Who founded Brenvik Labs?", KeywordRetriever(DOCUMENTS), WordLM(context_echo))


def test_branching_runs_each_query_and_merges_by_reciprocal_rank():
    retriever = KeywordRetriever(DOCUMENTS)
    by_question = Sequence((Step("rewrite", {"mode": "question"}), Step("retrieve")))
    by_keywords = Sequence((Step("rewrite", {"mode": "keywords"}), Step("retrieve")))
    flow = Sequence((Branching((by_question, by_keywords), Step("fuse")), Step("generate")))
    result = execute_flow(flow, "Who was born in Ostrik?", retriever, WordLM(context_echo), top_k=3)
    assert retriever.queries == ["Who was born in Ostrik?", "born Ostrik"]
    assert result.retrievals == 2 and result.rounds == 2
    # person is first in both lists; the keyword branch alone ranks city above org
    assert [h.chunk.chunk_id for h in result.hits] == ["person", "city", "org"]
    assert result.answer == "Ostrik."


def test_reciprocal_rank_fusion_arithmetic():
    retriever = KeywordRetriever(DOCUMENTS)
    first = retriever.retrieve("Tala Quon born Ostrik", top_k=3)  # person, then org / city
    second = retriever.retrieve("Ostrik region city Velmoria", top_k=3)  # city first
    fused = reciprocal_rank_fusion_hits([first, second], k=60)
    scores = {h.chunk.chunk_id: h.score for h in fused}
    rank_first = {h.chunk.chunk_id: r for r, h in enumerate(first, 1)}
    rank_second = {h.chunk.chunk_id: r for r, h in enumerate(second, 1)}
    for chunk_id, score in scores.items():
        expected = sum(1 / (60 + ranks[chunk_id]) for ranks in (rank_first, rank_second) if chunk_id in ranks)
        assert score == pytest.approx(expected)
    assert [h.score for h in fused] == sorted(scores.values(), reverse=True)


def test_multi_query_flow_reranks_the_fused_context():
    retriever = KeywordRetriever(DOCUMENTS)
    result = run_flow("multi_query", "Who was born in Ostrik?", retriever, WordLM(context_echo))
    assert steps(result)[-2:] == ["rerank", "generate"] and result.answer == "Ostrik."
    assert result.hits[-1].chunk.chunk_id == "person"  # the best-overlapping chunk sits nearest the question


def test_fixed_interval_retrieves_between_intervals_until_the_answer_ends():
    texts = ["one two three four", " five six seven eight", " nine ten."]
    lm = WordLM(lambda prompt, n: Reply(texts[n], finish=n == 2))
    retriever = KeywordRetriever(DOCUMENTS)
    pieces = []
    flow = build_flow("fixed_interval", interval=4)
    result = execute_flow(flow, "Who founded Brenvik Labs?", retriever, lm, on_text=pieces.append)
    assert result.answer == "one two three four five six seven eight nine ten." == "".join(pieces)
    assert result.lm_calls == 3 and result.rounds == 3  # the question, then after intervals one and two
    assert retriever.queries[1] == "Who founded Brenvik Labs? one two three four"
    assert all(call.max_tokens == 4 for call in lm.calls)


def test_loop_stops_at_max_rounds_when_the_judge_never_says_done():
    lm = WordLM(lambda prompt, n: Reply("more words", finish=False))
    result = execute_flow(build_flow("fixed_interval", interval=2, max_rounds=3), "Who founded Brenvik Labs?",
                          KeywordRetriever(DOCUMENTS), lm, max_tokens=100)
    assert result.lm_calls == 3 and result.answer == "more words" * 3
    assert [e.detail for e in result.trace if e.step == "loop"] == [{"rounds": 3, "stopped": "max_rounds"}]


def test_loop_as_data_ends_when_its_judge_says_done():
    lm = WordLM(lambda prompt, n: Reply("x y", finish=n == 1))
    flow = Loop(Step("generate", {"max_tokens": 3}), Step("finished"), max_rounds=5)
    result = execute_flow(flow, "q", KeywordRetriever(DOCUMENTS), lm)
    assert result.lm_calls == 2 and result.answer == "x y" + "x y"
    assert [e.detail for e in result.trace if e.step == "loop"] == [{"rounds": 2, "stopped": "done"}]


def test_loop_respects_the_token_budget():
    lm = WordLM(lambda prompt, n: Reply("a b c d e f", finish=False))
    flow = build_flow("fixed_interval", interval=4, max_rounds=10)
    result = execute_flow(flow, "q", KeywordRetriever(DOCUMENTS), lm, max_tokens=6)
    assert [c.max_tokens for c in lm.calls] == [4, 2] and result.answer == "a b c d" + "a b"


def flare_script(prompt: str, call: int) -> Reply:
    if "born in Ostrik" in prompt:
        return Reply("Ostrik is the answer.")  # confident once the person's document is in the context
    # the founder's name is a guess: "Tala" has probability 0.1
    return Reply("Tala Quon was born in Paris.", logprobs=[math.log(0.1), 0.0, 0.0, 0.0, 0.0, math.log(0.2)])


def test_flare_retrieves_with_the_masked_sentence_when_a_token_is_unlikely():
    retriever, lm = KeywordRetriever(DOCUMENTS), WordLM(flare_script)
    pieces = []
    result = run_flow("flare", "In which city was the founder of Brenvik Labs born?", retriever, lm, top_k=1,
                      on_text=pieces.append)
    # initial retrieval (question) finds the organisation; the look-ahead is unsure -> masked query
    assert retriever.queries[1] == "Quon was born in"
    assert result.answer == "Ostrik is the answer." == "".join(pieces)
    assert result.rounds == 2 and result.lm_calls == 2
    assert [h.chunk.chunk_id for h in result.hits] == ["org", "person"]


def test_flare_does_not_retrieve_when_every_token_is_likely():
    retriever = KeywordRetriever(DOCUMENTS)
    result = run_flow("flare", "Who founded Brenvik Labs?", retriever, WordLM(context_echo))
    assert result.rounds == 1 and retriever.queries == ["Who founded Brenvik Labs?"]
    assert result.answer == "Tala Quon."


def test_flare_commits_sentence_by_sentence():
    lm = WordLM(lambda prompt, n: Reply(["First one. Second one.", " Second one."][min(n, 1)]))
    pieces = []
    result = run_flow("flare", "q", KeywordRetriever(DOCUMENTS), lm, on_text=pieces.append)
    assert pieces == ["First one.", " Second one."] and result.answer == "First one. Second one."
    assert result.lm_calls == 2 and "First one." in lm.calls[1].prompt


@pytest.mark.parametrize("name", ["none", "single", "fixed_interval", "flare", "dragin", "multi_query",
                                  "routed"])
def test_streamed_text_concatenates_to_the_answer(name):
    pieces = []
    retriever = KeywordRetriever(DOCUMENTS)
    result = run_flow(name, "In which city was the founder of Brenvik Labs born?", retriever,
                      WordLM(context_echo), on_text=pieces.append)
    assert result.answer and "".join(pieces) == result.answer


def _state(question: str) -> FlowState:
    return FlowState(question, KeywordRetriever(DOCUMENTS), WordLM(context_echo), FlowSettings())
