"""GRID-style sentences: six word slots, one word from each, in a fixed order.

The fixed grammar makes word error rate meaningful on a tiny vocabulary and
lets evaluation report accuracy per slot (the letter slot is the hard one:
many letters look alike on the lips).
"""
from __future__ import annotations

import numpy as np

SLOT_NAMES: tuple[str, ...] = ("command", "colour", "preposition", "letter", "digit", "adverb")

SLOT_WORDS: dict[str, tuple[str, ...]] = {
    "command": ("bin", "lay", "place", "set"),
    "colour": ("blue", "green", "red", "white"),
    "preposition": ("at", "by", "in", "with"),
    # GRID leaves out 'w' (three syllables, unlike every other letter).
    "letter": tuple(c for c in "abcdefghijklmnopqrstuvxyz"),
    "digit": ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
    "adverb": ("again", "now", "please", "soon"),
}

# Every word, in slot order then within-slot order; no duplicates across slots.
VOCABULARY: tuple[str, ...] = tuple(w for name in SLOT_NAMES for w in SLOT_WORDS[name])
assert len(set(VOCABULARY)) == len(VOCABULARY), "a word appears in two slots"

SENTENCE_LENGTH = len(SLOT_NAMES)


def sample_sentence(rng: np.random.Generator) -> list[str]:
  """One word per slot, uniformly at random, in slot order."""
  return [SLOT_WORDS[name][int(rng.integers(len(SLOT_WORDS[name])))] for name in SLOT_NAMES]


def slot_of_position(i: int) -> str:
  """Slot name of word ``i`` of a grammatical sentence."""
  if not 0 <= i < SENTENCE_LENGTH:
    raise IndexError(f"word position {i} outside a {SENTENCE_LENGTH}-word GRID sentence")
  return SLOT_NAMES[i]


def is_grammatical(words: list[str] | tuple[str, ...]) -> bool:
  """True if ``words`` has one word of each slot, in slot order."""
  return (len(words) == SENTENCE_LENGTH
          and all(w in SLOT_WORDS[s] for w, s in zip(words, SLOT_NAMES)))
