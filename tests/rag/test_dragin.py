"""DRAGIN: RIND arithmetic and QFS on hand-made entropy/attention arrays, the cut before the triggering
sentence, the round on a scripted fake LM, and the round bound end to end."""

import pytest

from longbow.rag.dragin import (attention_received, cut_before_sentence, first_trigger, later_attention, qfs_query,
                        rind_scores, words_by_attention)
from longbow.rag.flows import build_flow, execute_flow, run_flow
from longbow.rag.types import Document
from tests.rag.test_flows_fakes import KeywordRetriever, Reply, WordLM

DOCUMENTS = [
    Document("org", "Brenvik Labs was founded in 1950 by Tala Quon."),
    Document("person", "Tala Quon was born in Ostrik."),
    Document("noise", "Morro Press sells kettles."),
]


def test_attention_received_is_the_max_over_later_tokens():
    prompt = 2
    attention = [[0.5, 0.5],  # token 0 attends to the prompt only
                 [0.1, 0.2, 0.7],  # token 1 pays 0.7 to token 0
                 [0.1, 0.1, 0.3, 0.5],  # token 2 pays 0.3 to token 0, 0.5 to token 1
                 [0.0, 0.0, 0.9, 0.05, 0.05]]
    assert attention_received(attention, prompt) == [0.9, 0.5, 0.05, 0.0]


def test_rind_multiplies_entropy_attention_and_the_content_indicator():
    attention = [[1.0], [0.5, 0.5], [0.2, 0.6, 0.2]]  # prompt of one token
    scores = rind_scores([2.0, 3.0, 4.0], attention, 1, [True, False, True])
    assert scores == pytest.approx([2.0 * 0.6, 0.0, 0.0])  # token 1 is a stopword; nothing attends to token 2
    assert first_trigger(scores, theta=1.0) == 0
    assert first_trigger(scores, theta=1.2) is None  # strictly greater than theta
    assert first_trigger([0.1, 2.0, 3.0], theta=1.5) == 1  # the first token above theta, not the largest


def test_later_attention_takes_the_max_from_the_trigger_on():
    attention = [[0.5, 0.5], [0.1, 0.2, 0.7], [0.6, 0.1, 0.2, 0.1], [0.0, 0.3, 0.1, 0.5, 0.1]]
    # prompt of 2; trigger = token 1: rows 1..3 cover positions 0..4 (the last token is never attended)
    assert later_attention(attention, 2, 1) == [0.6, 0.3, 0.7, 0.5, 0.1]


def test_qfs_from_later_tokens_can_pick_the_word_the_trigger_sentence_wrote():
    holder = []
    lm = WordLM(dragin_script(holder))
    holder.append(lm)
    retriever = KeywordRetriever(DOCUMENTS)
    flow = build_flow("dragin", theta=1.0, top_n=2, query_attention="later")
    execute_flow(flow, "In which city was the founder of Brenvik Labs born?", retriever, lm, top_k=1)
    # "Paris" (the trigger, token 9) is attended by token 10 with 0.8; with "trigger" it cannot be queried
    assert "Paris" in retriever.queries[1].split()


def test_words_by_attention_joins_subword_pieces():
    pieces = ["Bren", "vik", " Labs", ",", " was", " Ta", "la"]
    weights = [0.1, 0.4, 0.2, 0.9, 0.3, 0.05, 0.1]
    joined = [(w.word, w.weight, w.position) for w in words_by_attention(pieces, weights)]
    assert joined == [("Brenvik", 0.4, 0), ("Labs", 0.2, 2), (",", 0.9, 3), ("was", 0.3, 4), ("Tala", 0.1, 5)]


def test_qfs_takes_the_top_content_words_in_order_of_appearance():
    pieces = ["Question", ":", " who", " founded", " Bren", "vik", " Labs", "?", " The", " founder", " is"]
    weights = [0.0, 0.5, 0.9, 0.3, 0.2, 0.6, 0.1, 0.8, 0.7, 0.4, 0.05]
    # content words: founded 0.3, Brenvik 0.6, Labs 0.1, founder 0.4 ("Question" is an instruction word)
    assert qfs_query(pieces, weights, top_n=3) == "founded Brenvik founder"
    assert qfs_query(pieces, weights, top_n=3, allowed={"labs", "founded"}) == "founded Labs"
    assert qfs_query(pieces, weights, top_n=10).split() == ["founded", "Brenvik", "Labs", "founder"]


def test_qfs_counts_a_repeated_word_once_at_its_best_weight():
    pieces = [" Quon", " met", " Quon"]
    assert qfs_query(pieces, [0.1, 0.2, 0.9], top_n=2) == "Quon met"


def test_cut_before_the_triggering_sentence():
    text = "The founder is Tala Quon. She was born in Paris. Done."
    assert cut_before_sentence(text, text.index("Paris")) == "The founder is Tala Quon."
    assert cut_before_sentence(text, text.index("Tala")) == ""
    assert cut_before_sentence(text, text.index("Done")) == "The founder is Tala Quon. She was born in Paris."


def _attention_to(prompt_length: int, count: int, *, trigger: int, prompt_words: dict[int, float],
                  later_to_trigger: float) -> list[list[float]]:
    """Rows with small uniform weights; the token after the trigger attends strongly to it, and the
    trigger row puts the given weights on prompt positions."""
    rows = [[0.001] * (prompt_length + i) for i in range(count)]
    for position, weight in prompt_words.items():
        rows[trigger][position] = weight
    if trigger + 1 < count:
        rows[trigger + 1][prompt_length + trigger] = later_to_trigger
    return rows


def dragin_script(lm_holder):
    """Round 1 (org document in context): "The founder is Tala Quon. She was born in Paris." with high
    entropy on "Paris" (token 9) whose attention picks "Tala Quon" out of the prompt. Round 2 (the
    person's document is in): " She was born in Ostrik." with no uncertainty."""

    def script(prompt: str, call: int) -> Reply:
        if "born in Ostrik" in prompt:
            return Reply(" She was born in Ostrik.")
        text = "The founder is Tala Quon. She was born in Paris. Yes."
        entropies = [0.0] * 12
        entropies[9] = 3.0

        def attention(prompt_length, count):
            lm = lm_holder[0]
            prompt_ids = lm.tokenize(prompt)
            attended = {"Tala", "Quon.", "born?"}
            weights = {i: 0.5 for i, t in enumerate(prompt_ids) if lm.pieces[t].strip() in attended}
            return _attention_to(prompt_length, count, trigger=9, prompt_words=weights, later_to_trigger=0.8)

        return Reply(text, entropies=entropies, attention=attention)

    return script


def test_dragin_cuts_retrieves_with_the_attended_words_and_resumes():
    holder = []
    lm = WordLM(dragin_script(holder))
    holder.append(lm)
    retriever = KeywordRetriever(DOCUMENTS)
    pieces = []
    flow = build_flow("dragin", theta=1.0, top_n=3, query_attention="trigger")
    result = execute_flow(flow, "In which city was the founder of Brenvik Labs born?", retriever, lm, top_k=1,
                          on_text=pieces.append)
    # trigger score 3.0 * 0.8 on "Paris": keep the first sentence, query from the attended prompt words
    rounds = [e.detail for e in result.trace if e.step == "dragin"]
    assert rounds[0]["trigger"] == 9 and rounds[0]["score"] == pytest.approx(2.4)
    assert rounds[0]["kept"] == "The founder is Tala Quon."
    assert retriever.queries == ["In which city was the founder of Brenvik Labs born?", "Tala Quon born"]
    assert result.answer == "The founder is Tala Quon. She was born in Ostrik." == "".join(pieces)
    assert result.rounds == 2 and result.lm_calls == 2
    assert all(call.return_attention for call in lm.calls)
    assert lm.calls[1].prompt.endswith("<assistant>The founder is Tala Quon.")
    assert [h.chunk.chunk_id for h in result.hits] == ["org", "person"]


def test_dragin_does_not_retrieve_below_theta():
    holder = []
    lm = WordLM(dragin_script(holder))
    holder.append(lm)
    retriever = KeywordRetriever(DOCUMENTS)
    flow = build_flow("dragin", theta=2.5)
    result = execute_flow(flow, "Who founded Brenvik Labs?", retriever, lm, top_k=1)
    assert result.rounds == 1 and len(retriever.queries) == 1 and result.lm_calls == 1
    assert result.answer.startswith("The founder is Tala Quon. She was born in Paris.")


def test_dragin_rounds_are_bounded_when_every_round_triggers():
    always_unsure = Reply("Paris maybe.", entropies=[5.0, 5.0, 0.0],
                          attention=lambda p, n: [[1.0 / (p + i)] * (p + i) if i != 1 else [0.0] * p + [1.0]
                                                  for i in range(n)])
    lm = WordLM(lambda prompt, call: always_unsure)
    retriever = KeywordRetriever(DOCUMENTS)
    flow = build_flow("dragin", theta=0.5, max_retrieval_rounds=3)
    result = execute_flow(flow, "Where is Paris?", retriever, lm)
    assert result.rounds == 3 and len(retriever.queries) == 3
    assert result.lm_calls == 3  # two cut rounds, then a round that may not retrieve and commits
    assert result.answer == "Paris maybe."


def test_dragin_without_initial_retrieval_starts_from_the_model():
    lm = WordLM(lambda prompt, call: Reply("Ostrik."))
    retriever = KeywordRetriever(DOCUMENTS)
    result = execute_flow(build_flow("dragin", initial_retrieval=False), "Where?", retriever, lm)
    assert result.rounds == 0 and retriever.queries == [] and result.answer == "Ostrik."


# --- the real model -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_dragin_end_to_end_on_the_real_model_respects_the_round_bound(engine_lm):
    from longbow.rag.eval.synthetic import make_corpus

    corpus = make_corpus(0, num_documents=12)
    retriever = KeywordRetriever(corpus.documents)
    question = next(q for q in corpus.questions if q.hops == 2)
    pieces = []
    # theta 0: any content token that a later token attends to fires, so every round that may retrieve does
    flow = build_flow("dragin", theta=0.0, max_retrieval_rounds=2)
    result = execute_flow(flow, question.text, retriever, engine_lm, top_k=2, max_tokens=24,
                          on_text=pieces.append)
    assert result.answer.strip() and "".join(pieces) == result.answer
    assert result.rounds == 2 and len(retriever.queries) == 2
    assert 2 <= result.lm_calls <= 3
    assert retriever.queries[1] != question.text  # the QFS query, built from attended words
    assert engine_lm.engine.stats()["kv_blocks_used"] == 0


@pytest.mark.slow
def test_single_flow_streams_the_answer_on_the_real_model(engine_lm):
    from longbow.rag.eval.synthetic import make_corpus

    corpus = make_corpus(0, num_documents=12)
    pieces = []
    retriever = KeywordRetriever(corpus.documents)
    result = run_flow("single", corpus.questions[0].text, retriever, engine_lm, top_k=2,
                      max_tokens=16, on_text=pieces.append)
    assert result.answer and "".join(pieces) == result.answer and len(pieces) > 1
