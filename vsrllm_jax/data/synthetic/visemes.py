"""Pronunciations, phoneme->viseme classes and mouth shapes for the GRID words.

Lip reading is hard because different phonemes share one visible mouth shape
(a viseme): /p b m/ all close the lips, /t d/ look alike, and so on. The
synthetic data keeps that ambiguity on purpose: the letters 'b' and 'p' (or
'c' and 'z', 'd' and 't', 'l' and 'n') render identical viseme sequences and
can only be told apart by chance or by the language model's prior.
"""
from __future__ import annotations

import numpy as np

from vsrllm_jax.data.synthetic import grid_grammar

SILENCE = "sil"

# ARPAbet-like; letters are spelled as spoken (American English).
PRONUNCIATIONS: dict[str, tuple[str, ...]] = {
    # commands
    "bin": ("B", "IH", "N"), "lay": ("L", "EY"), "place": ("P", "L", "EY", "S"),
    "set": ("S", "EH", "T"),
    # colours
    "blue": ("B", "L", "UW"), "green": ("G", "R", "IY", "N"), "red": ("R", "EH", "D"),
    "white": ("W", "AY", "T"),
    # prepositions
    "at": ("AE", "T"), "by": ("B", "AY"), "in": ("IH", "N"), "with": ("W", "IH", "TH"),
    # letters
    "a": ("EY",), "b": ("B", "IY"), "c": ("S", "IY"), "d": ("D", "IY"), "e": ("IY",),
    "f": ("EH", "F"), "g": ("JH", "IY"), "h": ("EY", "CH"), "i": ("AY",), "j": ("JH", "EY"),
    "k": ("K", "EY"), "l": ("EH", "L"), "m": ("EH", "M"), "n": ("EH", "N"), "o": ("OW",),
    "p": ("P", "IY"), "q": ("K", "Y", "UW"), "r": ("AA", "R"), "s": ("EH", "S"),
    "t": ("T", "IY"), "u": ("Y", "UW"), "v": ("V", "IY"), "x": ("EH", "K", "S"),
    "y": ("W", "AY"), "z": ("Z", "IY"),
    # digits
    "zero": ("Z", "IH", "R", "OW"), "one": ("W", "AH", "N"), "two": ("T", "UW"),
    "three": ("TH", "R", "IY"), "four": ("F", "AO", "R"), "five": ("F", "AY", "V"),
    "six": ("S", "IH", "K", "S"), "seven": ("S", "EH", "V", "AH", "N"),
    "eight": ("EY", "T"), "nine": ("N", "AY", "N"),
    # adverbs
    "again": ("AH", "G", "EH", "N"), "now": ("N", "AW"), "please": ("P", "L", "IY", "Z"),
    "soon": ("S", "UW", "N"),
}

# Consonants by place of articulation, vowels by mouth opening/rounding
# (close to the MPEG-4 / Oculus 15-class set). Diphthongs glide between two
# visemes, so they map to two.
PHONEME_TO_VISEMES: dict[str, tuple[str, ...]] = {
    "P": ("PP",), "B": ("PP",), "M": ("PP",),          # bilabial: lips closed
    "F": ("FF",), "V": ("FF",),                        # labiodental: teeth on lip
    "TH": ("TH",), "DH": ("TH",),                      # dental: tongue tip
    "T": ("DD",), "D": ("DD",),                        # alveolar stops
    "K": ("KK",), "G": ("KK",), "NG": ("KK",), "HH": ("KK",),  # velar
    "CH": ("CH",), "JH": ("CH",), "SH": ("CH",), "ZH": ("CH",),  # postalveolar
    "S": ("SS",), "Z": ("SS",),                        # sibilants: teeth closed
    "N": ("NN",), "L": ("NN",),                        # alveolar sonorants
    "R": ("RR",), "ER": ("RR",),
    "W": ("UW",), "Y": ("IH",),                        # glides look like vowels
    "AA": ("AA",), "AE": ("AA",), "AH": ("AA",),
    "EH": ("EH",),
    "IH": ("IH",), "IY": ("IH",),
    "AO": ("OH",),
    "UW": ("UW",), "UH": ("UW",),
    "EY": ("EH", "IH"), "AY": ("AA", "IH"), "OW": ("OH", "UW"), "AW": ("AA", "UW"),
    "OY": ("OH", "IH"),
}

# Mouth-shape parameters, each in [0, 1]: what the renderer draws.
SHAPE_PARAMS: tuple[str, ...] = ("openness", "width", "rounding", "teeth", "tongue")

VISEME_SHAPES: dict[str, tuple[float, float, float, float, float]] = {
    #        open  width round teeth tongue
    SILENCE: (0.00, 0.50, 0.10, 0.00, 0.00),
    "PP":    (0.00, 0.42, 0.25, 0.00, 0.00),  # pressed lips, slightly pursed
    "FF":    (0.12, 0.50, 0.00, 1.00, 0.00),
    "TH":    (0.25, 0.55, 0.00, 0.60, 1.00),
    "DD":    (0.30, 0.58, 0.00, 0.70, 0.40),
    "KK":    (0.45, 0.52, 0.10, 0.30, 0.00),
    "CH":    (0.30, 0.35, 0.80, 0.90, 0.00),
    "SS":    (0.12, 0.68, 0.00, 1.00, 0.00),
    "NN":    (0.32, 0.52, 0.00, 0.40, 0.80),
    "RR":    (0.30, 0.35, 0.60, 0.20, 0.20),
    "AA":    (1.00, 0.62, 0.10, 0.30, 0.30),
    "EH":    (0.62, 0.78, 0.00, 0.50, 0.20),
    "IH":    (0.30, 0.92, 0.00, 0.80, 0.10),
    "OH":    (0.72, 0.38, 0.85, 0.10, 0.10),
    "UW":    (0.25, 0.22, 1.00, 0.00, 0.00),
}

VISEMES: tuple[str, ...] = tuple(VISEME_SHAPES)
VISEME_INDEX: dict[str, int] = {v: i for i, v in enumerate(VISEMES)}
SHAPE_TABLE = np.asarray([VISEME_SHAPES[v] for v in VISEMES], np.float32)  # [V, P]

_missing = set(grid_grammar.VOCABULARY) - set(PRONUNCIATIONS)
assert not _missing, f"no pronunciation for {sorted(_missing)}"
_unmapped = {p for ph in PRONUNCIATIONS.values() for p in ph} - set(PHONEME_TO_VISEMES)
assert not _unmapped, f"no viseme for phonemes {sorted(_unmapped)}"
assert {v for vs in PHONEME_TO_VISEMES.values() for v in vs} <= set(VISEME_SHAPES)


def word_to_visemes(word: str) -> list[str]:
  """Viseme sequence of one vocabulary word."""
  try:
    phonemes = PRONUNCIATIONS[word.lower()]
  except KeyError:
    raise KeyError(f"no pronunciation for word {word!r}; known: {len(PRONUNCIATIONS)} "
                   "GRID words (vsrllm_jax/data/visemes.py)") from None
  return [v for p in phonemes for v in PHONEME_TO_VISEMES[p]]


def sentence_to_visemes(words, word_gap: bool = True) -> list[str]:
  """Concatenated visemes of ``words``; a silence between words if ``word_gap``."""
  out: list[str] = []
  for i, word in enumerate(words):
    if i and word_gap:
      out.append(SILENCE)
    out.extend(word_to_visemes(word))
  return out


def shapes_of(visemes) -> np.ndarray:
  """Mouth-shape parameters of a viseme sequence, float32 [N, len(SHAPE_PARAMS)]."""
  return SHAPE_TABLE[[VISEME_INDEX[v] for v in visemes]]
