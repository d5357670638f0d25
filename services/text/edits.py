"""Character edits of a tokenized text, turned into the minimal token-span replacement.

An edit replaces characters [start, end) with new text. Only a window of tokens around it is
re-tokenized; the result is trimmed to the smallest span (i, j] of old tokens replaced by m new
tokens, so that the document's tokens stay exactly those a fresh tokenization of the new text gives.
Lives in the text layer (like text.py): the engine below it sees token ids only.
"""

from __future__ import annotations

from dataclasses import dataclass

from longbow.services.engine.errors import InvalidRequestError

# Tokens of unchanged text re-tokenized on each side of an edit. Byte-level BPE never merges across its
# pre-tokenizer's chunks, which are decided by a character or two of context, so a few tokens settle it;
# the window grows (and at worst covers the whole text) until both ends agree with the old tokens.
_WINDOW_STEPS = (4, 16, 64)


@dataclass(frozen=True)
class TokenizedText:
    text: str
    token_ids: tuple[int, ...]
    spans: tuple[tuple[int, int], ...]  # (start, end) characters of each token; contiguous, cover text

    @classmethod
    def of(cls, tokenizer, text: str) -> "TokenizedText":
        ids, spans = _tokenize(tokenizer, text)
        return cls(text, tuple(ids), tuple(spans))

    def tokens_before(self, cursor: int) -> int:
        """How many tokens end at or before character `cursor`."""
        return sum(1 for _, end in self.spans if end <= cursor)


@dataclass(frozen=True)
class TokenEdit:
    """Old tokens [start, end) are replaced by new_ids; `after` is the edited text."""

    start: int
    end: int
    new_ids: tuple[int, ...]
    after: TokenizedText


def apply_edit(tokenizer, doc: TokenizedText, start: int, end: int, replacement: str) -> TokenEdit:
    """Replace characters [start, end) of doc.text by `replacement` and find the token span that changed."""
    if not 0 <= start <= end <= len(doc.text):
        raise InvalidRequestError(f"edit [{start}, {end}) is outside the text (0..{len(doc.text)})")
    text = doc.text[:start] + replacement + doc.text[end:]
    shift = len(replacement) - (end - start)
    for margin in (*_WINDOW_STEPS, None):
        edit = _retokenize_window(tokenizer, doc, text, start, end, shift, margin)
        if edit is not None:
            return edit
    raise AssertionError("unreachable: the whole-text window always succeeds")


def _retokenize_window(tokenizer, doc, text, start, end, shift, margin) -> TokenEdit | None:
    n = len(doc.token_ids)
    first = next((k for k, (_, e) in enumerate(doc.spans) if e > start), n)  # first token touching the edit
    last = next((k for k in range(n - 1, -1, -1) if doc.spans[k][0] < end), -1) + 1  # one past the last
    lo = 0 if margin is None else max(0, min(first, last) - margin)
    hi = n if margin is None else min(n, max(first, last) + margin)
    char_lo = doc.spans[lo][0] if lo < n else len(doc.text)
    char_hi = doc.spans[hi - 1][1] if hi > 0 else 0
    char_hi = max(char_hi, end)
    ids, spans = _tokenize(tokenizer, text[char_lo: char_hi + shift])
    if margin is not None and not _anchored(doc, lo, hi, n, ids):
        return None
    new_spans = [(a + char_lo, b + char_lo) for a, b in spans]
    old_ids = doc.token_ids[lo:hi]
    keep_left = _common_prefix(old_ids, ids)
    keep_right = _common_suffix(old_ids[keep_left:], ids[keep_left:])
    i, j = lo + keep_left, hi - keep_right
    inserted = ids[keep_left: len(ids) - keep_right]
    after_spans = (*doc.spans[:lo], *new_spans, *((a + shift, b + shift) for a, b in doc.spans[hi:]))
    after = TokenizedText(text, (*doc.token_ids[:i], *inserted, *doc.token_ids[j:]), after_spans)
    return TokenEdit(i, j, tuple(inserted), after)


def _anchored(doc: TokenizedText, lo: int, hi: int, n: int, ids: list[int]) -> bool:
    """The re-tokenized window starts and ends with the same (untouched) tokens as before, so its
    edges are token boundaries of the fresh tokenization too (or are the text's own ends)."""
    if not ids:
        return lo == 0 and hi == n
    left_ok = lo == 0 or ids[0] == doc.token_ids[lo]
    right_ok = hi == n or ids[-1] == doc.token_ids[hi - 1]
    return left_ok and right_ok and len(ids) >= 2


def _common_prefix(a, b) -> int:
    k = 0
    while k < len(a) and k < len(b) and a[k] == b[k]:
        k += 1
    return k


def _common_suffix(a, b) -> int:
    k = 0
    while k < len(a) and k < len(b) and a[-1 - k] == b[-1 - k]:
        k += 1
    return k


def _tokenize(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    if not text:
        return [], []
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, spans = list(encoded.input_ids), [tuple(s) for s in encoded.offset_mapping]
    # Make spans contiguous and covering: byte-level BPE may report a multi-byte character's pieces with
    # overlapping or empty spans; what matters here is which characters each token owns.
    fixed, cursor = [], 0
    for k, (_, e) in enumerate(spans):
        e = len(text) if k == len(spans) - 1 else max(cursor, e)
        fixed.append((cursor, e))
        cursor = e
    return ids, fixed
