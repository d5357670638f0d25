"""The numpy MiniLM (rag/minilm.py) against sentence-transformers on the same bundled weights."""

from __future__ import annotations

import numpy as np

from longbow.rag.embed import shared_embedder
from longbow.rag.minilm import NumpyEmbedder

TEXTS = [
    "How do I pause my program and step through it line by line?",
    "def __len__(self) -> int: return a // b ** 2",
    "Ünïcödé, emoji 🙂 and CJK 漢字 in one query",
    "x",
    "word " * 400,  # past the 256-token limit: both truncate
]


def test_numpy_minilm_matches_sentence_transformers():
    expected = shared_embedder().embed(TEXTS)
    actual = NumpyEmbedder().embed(TEXTS)
    assert actual.shape == expected.shape == (len(TEXTS), 384) and actual.dtype == np.float32
    np.testing.assert_allclose(actual, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(actual, axis=1), 1.0, atol=1e-6)
    assert NumpyEmbedder().embed([]).shape == (0, 384)
