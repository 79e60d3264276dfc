"""Tasks of VSP-LLM's LRS3 manifests and their instructions.

A manifest id carries its language pair as a path component: ``lrs3/en-en``
(or ``lrs3/en-en/<clip>``) is visual speech recognition in English, ``en-es``,
``en-fr``, ``en-it`` and ``en-pt`` are visual speech translation from English
into Spanish, French, Italian and Portuguese. The instructions are VSP-LLM's
(``vsp_llm_dataset.py``): "Recognize this speech in English. Input : " and
"Translate this English speech to Spanish. Input : ", so a checkpoint trained
with either codebase sees the prompt it was trained on.
"""
from __future__ import annotations

import re

LANGUAGES = {"en": "English", "es": "Spanish", "fr": "French", "it": "Italian",
             "pt": "Portuguese"}
VSR = "vsr"
# task -> (source language, target language)
TASKS = {VSR: ("en", "en"), "vst_es": ("en", "es"), "vst_fr": ("en", "fr"),
         "vst_it": ("en", "it"), "vst_pt": ("en", "pt")}
_PAIR_TO_TASK = {f"{src}-{tgt}": task for task, (src, tgt) in TASKS.items()}
_PAIR = re.compile(r"^[a-z]{2,3}-[a-z]{2,3}$")


def is_language_pair(part: str) -> bool:
  """Whether an id component looks like a language pair (``en-fr``)."""
  return bool(_PAIR.match(part))


def task_from_id(manifest_id: str) -> str:
  """``vsr`` or ``vst_<lang>`` from the language-pair component of a manifest id.

  The first component that looks like ``xx-yy`` is the pair; an id without
  one, or with a pair we have no task for, is an error naming the id.
  """
  for part in str(manifest_id).split("/"):
    if is_language_pair(part):
      if part not in _PAIR_TO_TASK:
        raise ValueError(f"manifest id {manifest_id!r}: language pair {part!r} has no task; "
                         f"known pairs: {sorted(_PAIR_TO_TASK)}")
      return _PAIR_TO_TASK[part]
  raise ValueError(f"manifest id {manifest_id!r} has no language-pair component (e.g. "
                   f"'lrs3/en-en/<clip>'); known pairs: {sorted(_PAIR_TO_TASK)}")


def language_pair(task: str) -> tuple[str, str]:
  """(source, target) language codes of ``task``."""
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; known tasks: {sorted(TASKS)}")
  return TASKS[task]


def instruction(task: str) -> str:
  """VSP-LLM's instruction text for ``task`` (trailing space included, as theirs)."""
  src, tgt = language_pair(task)
  if src == tgt:
    return f"Recognize this speech in {LANGUAGES[src]}. Input : "
  return f"Translate this {LANGUAGES[src]} speech to {LANGUAGES[tgt]}. Input : "


def instructions() -> dict[str, str]:
  """Every task's instruction, e.g. for tokenizing them once up front."""
  return {task: instruction(task) for task in TASKS}
