"""The reader prompt (few-shot turns ending in "So the answer is ...") and the extraction of the short
answer, rule by rule; the prompt reaching the LM through a flow, on the fake LM."""

import pytest

from longbow.rag.flows import run_flow
from longbow.rag.modules.generation import build_prompt
from longbow.rag.modules.reader import ANSWER_CUE, EXAMPLES, extract_answer, reader_messages
from longbow.rag.types import Chunk, Document, Hit
from tests.rag.test_flows_fakes import KeywordRetriever, Reply, WordLM


def _hit(text: str) -> Hit:
    return Hit(Chunk("d", "d", text, 0, len(text), {}), 1.0)


# --- extraction -----------------------------------------------------------------------------------------

def test_the_span_after_the_cue_up_to_its_sentence_end():
    text = "Brenvik Labs was founded by Tala Quon. Tala Quon was born in Ostrik. So the answer is Ostrik."
    assert extract_answer(text) == "Ostrik"
    assert extract_answer("So the answer is Tala Quon. Tala was a poet.") == "Tala Quon"
    assert extract_answer("the answer is: 1950\nmore text") == "1950"
    assert extract_answer("THE ANSWER IS Ostrik") == "Ostrik"  # case-insensitive, no sentence end


def test_the_first_cue_wins_over_a_repeated_guess():
    assert extract_answer("So the answer is Tala Quon. So the answer is 2002.") == "Tala Quon"


def test_without_a_cue_the_last_complete_sentence():
    assert extract_answer("Tala Quon founded it. She was born in Ostrik.") == "She was born in Ostrik"
    # the cut-off fragment after the last full stop is not an answer
    assert extract_answer("She was born in Ostrik. Then she mov") == "She was born in Ostrik"
    assert extract_answer("Ostrik") == "Ostrik"  # no sentence end at all: the text itself
    assert extract_answer("") == "" and extract_answer("  \n ") == ""


def test_wrapping_quotes_markdown_and_trailing_punctuation_are_stripped():
    assert extract_answer('So the answer is "Ostrik".') == "Ostrik"
    assert extract_answer("So the answer is **Velmoria**!") == "Velmoria"
    assert extract_answer("So the answer is (1950).") == "1950"
    assert extract_answer("So the answer is Tala Quon's.") == "Tala Quon's"  # an apostrophe inside stays


def test_leading_articles_and_prepositions_are_stripped():
    assert extract_answer("So the answer is the Brex.") == "Brex"
    assert extract_answer("So the answer is in Ostrik.") == "Ostrik"
    assert extract_answer("So the answer is in the region of Velmoria.") == "region of Velmoria"
    assert extract_answer("So the answer is Anna Lee.") == "Anna Lee"  # "An" only as a whole word


# --- the prompt -----------------------------------------------------------------------------------------

def test_reader_messages_are_the_examples_then_the_question_with_its_documents():
    messages = reader_messages("Who founded Brenvik Labs?", [_hit("Brenvik Labs was founded by Tala Quon.")])
    assert [m["role"] for m in messages] == ["user", "assistant"] * len(EXAMPLES) + ["user"]
    for example, (user, assistant) in zip(EXAMPLES, zip(messages[0::2], messages[1::2])):
        assert example.question in user["content"] and all(c in user["content"] for c in example.context)
        assert assistant["content"].endswith(f"{ANSWER_CUE} {extract_answer(example.answer)}.")
    last = messages[-1]["content"]
    assert last.endswith("Question: Who founded Brenvik Labs?")
    assert "Context:\nBrenvik Labs was founded by Tala Quon." in last
    assert "Context:" not in reader_messages("Who?", [])[-1]["content"]


def test_example_names_cannot_come_from_the_synthetic_corpus():
    from longbow.rag.eval.synthetic import make_corpus

    names = {d.metadata["title"].lower() for seed in range(3) for d in make_corpus(seed).documents}
    assert all("q" not in name for name in names)  # every example entity name has a q
    assert all("q" in example.question.lower() for example in EXAMPLES)


def test_build_prompt_uses_the_named_prompt_and_drops_the_oldest_documents_to_fit():
    lm = WordLM(lambda prompt, call: Reply("x"))
    hits = [_hit("old document words"), _hit("new document words")]
    reader = lm.detokenize(build_prompt(lm, "Q?", hits, "So far", 8, prompt="reader"))
    assert reader.count("<user>") == len(EXAMPLES) + 1 and reader.endswith("<assistant>So far")
    phrase = lm.detokenize(build_prompt(lm, "Q?", hits, "", 8))
    assert phrase.count("<user>") == 1 and EXAMPLES[0].question not in phrase
    full = len(build_prompt(lm, "Q?", hits, "", 0, prompt="reader"))
    lm.max_context = full + 2  # room for 2 new tokens only once the oldest document ("old ...") is gone
    fitted = lm.detokenize(build_prompt(lm, "Q?", hits, "", 2 + 3, prompt="reader"))
    assert "old document" not in fitted and "new document" in fitted


def test_a_flow_with_the_reader_prompt_returns_the_extracted_answer():
    lm = WordLM(lambda prompt, call: Reply("Tala Quon was born in Ostrik. So the answer is Ostrik."))
    retriever = KeywordRetriever([Document("p", "Tala Quon was born in Ostrik.")])
    result = run_flow("single", "Where was Tala Quon born?", retriever, lm, prompt="reader")
    assert result.short_answer == "Ostrik" and result.answer.endswith("So the answer is Ostrik.")
    assert ANSWER_CUE in lm.calls[0].prompt and EXAMPLES[0].answer in lm.calls[0].prompt
    plain = run_flow("single", "Where was Tala Quon born?", retriever, lm)
    assert EXAMPLES[0].answer not in lm.calls[1].prompt and plain.short_answer == plain.answer.strip()
    with pytest.raises(ValueError, match="reader"):
        run_flow("single", "q", retriever, lm, prompt="chatty")


# --- the real model -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_real_model_follows_the_reader_format_in_single_and_dragin_flows(engine_lm):
    from longbow.rag.eval.synthetic import make_corpus

    corpus = make_corpus(0, num_documents=12)
    retriever = KeywordRetriever(corpus.documents)
    single_hop = next(q for q in corpus.questions if q.hops == 1)
    result = run_flow("single", single_hop.text, retriever, engine_lm, top_k=2, max_tokens=48,
                      prompt="reader")
    assert ANSWER_CUE.lower() in result.answer.lower()
    assert result.short_answer == extract_answer(result.answer) and 1 <= len(result.short_answer.split()) <= 3
    two_hop = next(q for q in corpus.questions if q.hops == 2)
    pieces = []
    result = run_flow("dragin", two_hop.text, retriever, engine_lm, top_k=2, max_tokens=48, prompt="reader",
                      on_text=pieces.append)
    assert "".join(pieces) == result.answer and result.short_answer
    assert engine_lm.engine.stats()["kv_blocks_used"] == 0
