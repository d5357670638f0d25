"""The engine-backed LM (rag's only door to the model) against the engine itself and transformers."""

import math

import pytest
import torch

pytestmark = pytest.mark.slow


def test_token_logprobs_match_transformers(engine_lm, hf_model):
    ids = engine_lm.tokenize("The capital of France is Paris. It is known for the Eiffel Tower.")
    ours = engine_lm.token_logprobs(ids)
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0].float()
    reference = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert len(ours) == len(ids) - 1
    torch.testing.assert_close(torch.tensor(ours), reference, atol=2e-4, rtol=0)


def test_offsets_cover_the_text(engine_lm):
    text = "Ünïcode — text, with spaces  and\nnewlines."
    ids, spans = engine_lm.tokenize_with_offsets(text)
    assert len(ids) == len(spans) and ids == engine_lm.tokenize(text)
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    assert all(a[1] <= b[0] + 1 for a, b in zip(spans, spans[1:]))


def test_generate_stops_on_string_and_returns_attention(engine_lm):
    prompt = engine_lm.chat([{"role": "user", "content": "Count from 1 to 20 separated by commas."}])
    full = engine_lm.generate(prompt, max_tokens=40)
    assert full.token_ids and len(full.entropies) == len(full.token_ids)
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 2]
    pieces = []
    cut = engine_lm.generate(prompt, max_tokens=40, stop=[stop], return_attention=True, on_text=pieces.append)
    assert cut.text == full.text[: full.text.index(stop)] and cut.finish_reason == "stop"
    assert "".join(pieces) == cut.text and len(pieces) > 1
    assert len(cut.attention) == len(cut.token_ids)
    for i, row in enumerate(cut.attention):
        assert len(row) == len(prompt) + i and math.isclose(sum(row), 1.0, abs_tol=1e-3)
    assert engine_lm.engine.stats()["kv_blocks_used"] == 0


def test_next_token_logprobs(engine_lm):
    prompt = engine_lm.tokenize("One, two, three,")
    four, cat = engine_lm.tokenize(" four")[0], engine_lm.tokenize(" cat")[0]
    lp_four, lp_cat = engine_lm.next_token_logprobs(prompt, [four, cat])
    assert lp_four > lp_cat and lp_four == pytest.approx(engine_lm.token_logprobs([*prompt, four])[-1])
