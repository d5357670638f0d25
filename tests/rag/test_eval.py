"""longbow.rag.eval: the synthetic corpus and chunking set are deterministic and self-consistent; the metrics
agree with hand-computed values."""

import pytest

from longbow.rag.eval.metrics import (answer_contains, boundary_f1, exact_match, normalize_answer,
                                     paired_bootstrap, pk, sign_test, token_f1, wilson_interval)
from longbow.rag.eval.synthetic import make_chunking_set, make_corpus


def test_corpus_is_deterministic_for_a_seed_and_differs_across_seeds():
    first, again, other = make_corpus(7), make_corpus(7), make_corpus(8)
    assert first.documents == again.documents and first.questions == again.questions
    assert [d.text for d in first.documents] != [d.text for d in other.documents]


def test_corpus_has_the_requested_size_and_both_hop_counts():
    corpus = make_corpus(3, num_documents=40)
    assert len(corpus.documents) == 40
    assert len({d.document_id for d in corpus.documents}) == 40
    hops = {q.hops for q in corpus.questions}
    assert hops == {1, 2}
    assert len({q.qid for q in corpus.questions}) == len(corpus.questions)


def test_every_gold_answer_is_in_its_last_gold_span_and_spans_are_sentences():
    corpus = make_corpus(11)
    for question in corpus.questions:
        assert len(question.gold_spans) == question.hops
        texts = [corpus.document(d).text[start:end] for d, start, end in question.gold_spans]
        assert question.answer in texts[-1], question
        assert all(t.endswith(".") and t[0].isupper() for t in texts)
        assert [span[0] for span in question.gold_spans] == question.gold_document_ids or question.hops == 1


def test_two_hop_questions_need_both_documents_and_the_first_hop_names_the_bridge():
    corpus = make_corpus(5)
    two_hop = [q for q in corpus.questions if q.hops == 2]
    assert len(two_hop) > 20
    for question in two_hop:
        first, second = (corpus.document(d) for d in question.gold_document_ids)
        assert first.document_id != second.document_id
        d, start, end = question.gold_spans[0]
        first_sentence = corpus.document(d).text[start:end]
        assert question.answer not in first_sentence and question.answer not in question.text
        assert second.metadata["title"] in first_sentence  # the bridge entity leads to the second document


def test_chunking_set_is_deterministic_and_boundaries_start_documents():
    samples = make_chunking_set(4, 5)
    assert samples == make_chunking_set(4, 5) and samples != make_chunking_set(5, 5)
    for sample in samples:
        assert 2 <= len(sample.boundaries) <= 5
        assert sample.boundaries == sorted(sample.boundaries)
        for b in sample.boundaries:
            assert 0 < b < len(sample.text)
            assert sample.text[b - 1] == " " and sample.text[b - 2] == "." and sample.text[b].isupper()


def test_answer_scores_on_hand_examples():
    assert normalize_answer("The  Tesk River!") == "tesk river"
    assert exact_match("the Feirtmar.", "Feirtmar") == 1.0
    assert exact_match("in Feirtmar", "Feirtmar") == 0.0
    assert token_f1("born in Feirtmar", "Feirtmar") == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))
    assert token_f1("Aldo Brenn", "Brenn Aldo") == 1.0
    assert token_f1("nothing", "Feirtmar") == 0.0
    assert answer_contains("He was born in Feirtmar.", "feirtmar") == 1.0
    assert answer_contains("Feirtmarsk", "Feirtmar") == 0.0


def test_boundary_f1_with_tolerance():
    assert boundary_f1([10, 50], [10, 50]) == 1.0
    assert boundary_f1([12, 80], [10, 50], tolerance=2) == pytest.approx(0.5)
    assert boundary_f1([12, 80], [10, 50], tolerance=1) == 0.0
    # one prediction cannot match two gold boundaries
    assert boundary_f1([10], [9, 11], tolerance=1) == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert boundary_f1([], []) == 1.0 and boundary_f1([], [5]) == 0.0


def test_pk_on_hand_examples():
    # length 20, gold boundary at 10, window 5: pairs (i, i+5) for i in 0..14
    assert pk([10], [10], 20, window=5) == 0.0
    # no predicted boundary: pairs straddling 10 (i = 5..9) disagree -> 5 of 15
    assert pk([], [10], 20, window=5) == pytest.approx(5 / 15)
    # boundary off by 2 (at 12): pairs i=5,6 (gold split, predicted not) and i=10,11 (predicted split) -> 4/15
    assert pk([12], [10], 20, window=5) == pytest.approx(4 / 15)
    assert pk([], [10], 20) == pk([], [10], 20, window=5)


def test_wilson_interval_brackets_the_share():
    low, high = wilson_interval(8, 40)
    assert low < 0.2 < high and 0.09 < low < 0.11 and 0.34 < high < 0.36


def test_sign_test_against_the_binomial_by_hand():
    assert sign_test(10, 0) == pytest.approx(2 / 1024)  # 2 * 0.5^10
    assert sign_test(0, 10) == sign_test(10, 0)
    assert sign_test(7, 3) == pytest.approx(2 * (1 + 10 + 45 + 120) / 1024)  # 2 * P(X <= 3), n = 10
    assert sign_test(5, 5) == 1.0 and sign_test(0, 0) == 1.0


def test_paired_bootstrap_separates_a_clear_win_from_a_tie():
    better, baseline = [1.0] * 12 + [0.0] * 8, [0.0] * 20
    assert paired_bootstrap(better, baseline) < 0.001
    assert paired_bootstrap(baseline, better) == 1.0
    assert paired_bootstrap([1.0, 0.0] * 10, [0.0, 1.0] * 10) > 0.4  # as many losses as wins
    again = paired_bootstrap(better, baseline, seed=1)
    assert paired_bootstrap(better, baseline, seed=1) == again  # seeded: the same resamples
    with pytest.raises(ValueError):
        paired_bootstrap([1.0], [1.0, 0.0])
