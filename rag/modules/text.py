"""Word-level helpers shared by the flows and DRAGIN: stopwords, content words, sentence spans, and the
character span of each generated token."""

from __future__ import annotations

import re

from longbow.rag.lm import LM

# NOTE: a compact English stopword list (function words, auxiliaries, question words) rather than a
# dependency; content words are everything else that contains a letter or a digit.
STOPWORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between
both but by can could did do does doing down during each few for from further had has have having he her
here hers herself him himself his how i if in into is it its itself just me more most my myself no nor not
now of off on once only or other our ours ourselves out over own same she should so some such than that the
their theirs them themselves then there these they this those through to too under until up very was we
were what when where which while who whom why will with would you your yours yourself yourselves also
answer short phrase context question
""".split())

_WORD = re.compile(r"[A-Za-z0-9]+(?:['’][A-Za-z]+)?")
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)|\n")


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def is_content_word(word: str) -> bool:
    return bool(_WORD.fullmatch(word)) and word.lower() not in STOPWORDS


def content_words(text: str) -> list[str]:
    return [w for w in words(text) if is_content_word(w)]


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each sentence; a sentence ends after . ! ? followed by whitespace or the end, or at a
    newline; whitespace between sentences belongs to the following sentence. Covers text exactly."""
    spans, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        end = match.end()
        if text[start:end].strip():
            spans.append((start, end))
            start = end
    if start < len(text):
        if spans and not text[start:].strip():
            spans[-1] = (spans[-1][0], len(text))
        else:
            spans.append((start, len(text)))
    return spans


def token_spans(lm: LM, token_ids: list[int], text: str) -> list[tuple[int, int]]:
    """Character span of each generated token inside `text` (the generation's text), found by decoding
    growing prefixes. NOTE: quadratic in length, fine for the <= 128-token answers flows produce; special
    tokens (EOS) get an empty span at the end."""
    spans, previous = [], 0
    for i in range(len(token_ids)):
        end = min(len(lm.detokenize(token_ids[: i + 1])), len(text))
        end = max(end, previous)
        spans.append((previous, end))
        previous = end
    return spans


def token_is_content(spans: list[tuple[int, int]], text: str) -> list[bool]:
    """Whether each token overlaps a content word of text (s_i in DRAGIN's RIND)."""
    word_spans = [(m.start(), m.end(), is_content_word(m.group())) for m in _WORD.finditer(text)]
    return [any(content and start < w_end and w_start < end for w_start, w_end, content in word_spans)
            for start, end in spans]
