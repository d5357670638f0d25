"""The BM25 analyzer for technical and code text: one function, `bm25_terms(text)`, used for chunks and
queries alike (a term matches only if both sides produce it).

Rules, each with a test in tests/rag/test_analyzer.py:
1. Programming keywords stay: only English function words that are not keywords of Python, C-family
   languages or shells are dropped (`and`, `or`, `not`, `is`, `in`, `if`, `for`, `with`, `as` stay).
   BM25's IDF already gives frequent words little weight; the stopword list only saves index space.
2. Operators are terms: `//`, `**`, `+=`, `->`, `~`, `==`, ... (longest first). A lone `-` or `/` glued
   to words (`read-only`, `and/or`) is a hyphen or slash, not an operator.
3. Identifiers are split and kept whole: `read_text` -> read_text, read, text; `getValue` -> getvalue,
   get, value; `HTTPServer` -> httpserver, http, server; `__len__` -> __len__, len.
4. Light stemming (Harman's S-stemmer, words of 4+ letters): `dicts` -> dict, `queries` -> query,
   `classes` -> class (-sses/-xes/-ches/-shes lose -es, where Harman's rule leaves classe); nothing
   else is stemmed, so `process`, `status`, `bytes`... stay recognisable.
"""

from __future__ import annotations

import re

# Lucene's English stopwords minus every word that is also a keyword in Python, C-family languages or
# shells (and, as, for, if, in, is, not, or, then, with, no...).
STOPWORDS = frozenset({"a", "an", "are", "at", "be", "but", "by", "into", "it", "of", "on", "such", "that",
                       "the", "their", "there", "these", "they", "this", "to", "was", "will"})

_OPERATORS = sorted([
    "**=", "//=", ">>=", "<<=", "...", "**", "//", "+=", "-=", "*=", "/=", "%=", "&=", "|=", "^=", "@=",
    "==", "!=", "<=", ">=", "<<", ">>", "->", "=>", ":=", "&&", "||", "++", "--", "::",
    "+", "*", "%", "~", "^", "&", "|", "<", ">", "=", "@", "!",
], key=len, reverse=True)
# A word (identifier characters, possibly dunder), an operator, or a free-standing - or /.
_TOKEN = re.compile(r"\w+|" + "|".join(map(re.escape, _OPERATORS)) + r"|(?<![\w])[-/](?![\w])")
_CAMEL = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+")


def bm25_terms(text: str) -> list[str]:
    """Terms of `text` in order: operators, whole identifiers (lowercased) followed by their parts,
    plural-stemmed; English stopwords dropped (never programming keywords)."""
    terms: list[str] = []
    for token in _TOKEN.findall(text):
        if not (token[0].isalnum() or token[0] == "_"):
            terms.append(token)
            continue
        for term in _word_terms(token):
            if term not in STOPWORDS:
                terms.append(term)
    return terms


def _word_terms(token: str) -> list[str]:
    """The whole token (stemmed), then its snake_case / camelCase parts when there is more than one."""
    whole = token.lower()
    parts = [p.lower() for piece in token.split("_") for p in _CAMEL.findall(piece)]
    if whole.strip("_") == whole and len(parts) <= 1:
        return [stem(whole)]
    return [stem(whole)] + [stem(p) for p in parts if p != whole]


def stem(word: str) -> str:
    """Harman's S-stemmer on words of 4+ letters: -ies -> -y, -es -> -e, -s -> '' (with its exceptions)."""
    if len(word) < 4 or not word.isalpha():
        return word
    if word.endswith("ies") and not word.endswith(("eies", "aies")):
        return word[:-3] + "y"
    if word.endswith(("sses", "xes", "ches", "shes", "zzes")):  # NOTE: Harman gives classe, boxe: -es goes
        return word[:-2]
    if word.endswith("es") and not word.endswith(("aes", "ees", "oes")):
        return word[:-1]
    if word.endswith("s") and not word.endswith(("us", "ss")):
        return word[:-1]
    return word
