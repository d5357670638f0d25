"""Seeded invented names (people, places, organisations, rivers) for the synthetic corpus.

Names are built from syllables so a language model cannot know facts about them: every answer in the
corpus has to come from retrieved text.
"""

from __future__ import annotations

import random

_ONSETS = ["b", "br", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "th", "h"]
_VOWELS = ["a", "e", "i", "o", "u", "a", "e", "o"]
_CODAS = ["", "", "", "n", "r", "l", "s", "m", "x"]
_PLACE_ENDINGS = ["mar", "holm", "vik", "ford", "stad", "wick", "moor", "dale", "gard", "port"]
_ORGANISATION_SUFFIXES = ["Labs", "Dynamics", "Foundry", "Institute", "Works", "Systems", "Collective",
                          "Guild", "Holdings", "Press"]


class NameMaker:
    """Draws names that are unique within one corpus: no two entities share a name or a word of one."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used_words: set[str] = set()

    def _syllable(self) -> str:
        return self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) + self.rng.choice(_CODAS)

    def _fresh(self, build) -> str:
        for _ in range(1000):
            word = build()
            if word.lower() not in self.used_words and 4 <= len(word) <= 9:
                self.used_words.add(word.lower())
                return word
        raise RuntimeError("name space exhausted")  # NOTE: unreachable for the corpus sizes we use

    def word(self, syllables: int = 2) -> str:
        return self._fresh(lambda: "".join(self._syllable() for _ in range(syllables)).capitalize())

    def person(self) -> str:
        return f"{self.word(2)} {self.word(self.rng.choice([2, 3]))}"

    def place(self) -> str:
        return self._fresh(lambda: (self._syllable() + self.rng.choice(_PLACE_ENDINGS)).capitalize())

    def organisation(self) -> str:
        return f"{self.word(self.rng.choice([2, 3]))} {self.rng.choice(_ORGANISATION_SUFFIXES)}"
