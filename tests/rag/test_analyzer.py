"""The BM25 analyzer (rag/analyzer.py): one test per rule, and the rules seen through BM25 search."""

from __future__ import annotations

import pytest

from longbow.rag.analyzer import STOPWORDS, bm25_terms, stem
from longbow.rag.index import SparseIndex

PYTHON_KEYWORDS = ["and", "as", "for", "if", "in", "is", "not", "or", "with", "return", "None", "def"]


def test_programming_keywords_are_never_stopwords():
    assert bm25_terms(" ".join(PYTHON_KEYWORDS)) == [k.lower() for k in PYTHON_KEYWORDS]
    assert bm25_terms("the value of a list") == ["value", "list"]  # English function words still go
    assert not {"and", "or", "not", "is", "in", "if", "for", "with", "as", "then", "no"} & STOPWORDS


@pytest.mark.parametrize("text, operator", [
    ("a // b", "//"), ("x ** 2", "**"), ("n += 1", "+="), ("~mask", "~"), ("a == b", "=="),
    ("def f() -> int", "->"), ("x //= 3", "//="), ("if (y := f())", ":="), ("a != b", "!="), ("a - b", "-"),
])
def test_operators_are_terms(text, operator):
    assert operator in bm25_terms(text)


def test_hyphens_and_slashes_inside_words_are_not_operators():
    assert bm25_terms("read-only and/or") == ["read", "only", "and", "or"]


@pytest.mark.parametrize("identifier, terms", [
    ("read_text", ["read_text", "read", "text"]),
    ("getValue", ["getvalue", "get", "value"]),
    ("HTTPServer", ["httpserver", "http", "server"]),
    ("__len__", ["__len__", "len"]),
    ("Value", ["value"]),
])
def test_identifiers_are_kept_whole_and_split(identifier, terms):
    assert bm25_terms(identifier) == terms


@pytest.mark.parametrize("word, stemmed", [
    ("dicts", "dict"), ("queries", "query"), ("classes", "class"), ("boxes", "box"), ("matches", "match"),
    ("bytes", "byte"), ("status", "status"), ("process", "process"), ("is", "is"), ("has", "has"),
])
def test_light_plural_stemming(word, stemmed):
    assert stem(word) == stemmed
    assert bm25_terms(word) == [stemmed]


def test_rules_reach_bm25_search():
    sparse = SparseIndex()
    sparse.add([1, 2, 3, 4], [
        "def __len__(self): return the number of items",
        "Floor division a // b rounds toward negative infinity.",
        "Merge two dicts with the | operator.",
        "Cats and dogs are pets; this sentence is prose.",
    ])
    assert [i for i, _ in sparse.search("len", 10, None)][0] == 1
    assert [i for i, _ in sparse.search("//", 10, None)] == [2]
    assert [i for i, _ in sparse.search("dict", 10, None)][0] == 3
    assert [i for i, _ in sparse.search("not or", 10, None)] == []  # kept, but absent from every chunk
