"""Synthetic lip-reading data: determinism, speaker splits, grammar, visemes, rendering."""
from __future__ import annotations

import dataclasses
import importlib

import numpy as np
import pytest

from vsrllm_jax.data.synthetic import grid_grammar
from vsrllm_jax.data.synthetic import mouth_renderer
from vsrllm_jax.data.synthetic import synthetic_lips
from vsrllm_jax.data.synthetic import visemes
from vsrllm_jax.data.synthetic.spec import SPLITS, SyntheticLipsSpec, max_speech_visemes

SPEC = SyntheticLipsSpec(image_size=16, max_frames=48, train_clips=40, validation_clips=8,
                         test_clips=8, generation_seed=0)
QUIET = dict(pixel_noise_std=0.0, speaker_noise_std_range=(0.0, 0.0), frame_jitter_px=0.0,
             frame_scale_jitter=0.0, frame_brightness_jitter=0.0)


def _records(builder, split):
  source = builder.as_data_source(split=split)
  return [source[i] for i in range(len(source))]


@pytest.fixture(scope="module")
def builder(tmp_path_factory):
  return synthetic_lips.prepare(SPEC, tmp_path_factory.mktemp("data_a"))


def test_builder_is_deterministic(builder, tmp_path):
  again = synthetic_lips.prepare(SPEC, tmp_path / "data_b")
  for split in SPLITS:
    first, second = _records(builder, split), _records(again, split)
    assert len(first) == len(second) == SPEC.num_clips(split)
    for a, b in zip(first, second):
      assert a["id"] == b["id"] and a["text"] == b["text"] and a["speaker"] == b["speaker"]
      np.testing.assert_array_equal(a["video"], b["video"])
  other = synthetic_lips.prepare(dataclasses.replace(SPEC, generation_seed=1), tmp_path / "c")
  assert other.builder_config.name != builder.builder_config.name
  differ = [a["video"].shape != b["video"].shape or (a["video"] != b["video"]).any()
            for a, b in zip(_records(builder, "train"), _records(other, "train"))]
  assert all(differ)


def test_records_match_generate_clip_in_any_order(builder):
  source = builder.as_data_source(split="validation")
  for index in (7, 2, 5):  # any order: each clip depends on (seed, split, index) only
    clip = synthetic_lips.generate_clip(SPEC, "validation", index)
    np.testing.assert_array_equal(source[index]["video"], clip["video"])
    assert source[index]["id"].decode() == clip["id"]


def test_test_speakers_are_unseen(builder):
  speakers = {split: {r["speaker"] for r in _records(builder, split)} for split in SPLITS}
  assert speakers["train"] <= set(SPEC.train_speakers)
  assert not speakers["test"] & (set(SPEC.train_speakers) | set(SPEC.validation_speakers))
  assert not speakers["validation"] & set(SPEC.train_speakers)
  with pytest.raises(ValueError, match="disjoint"):
    dataclasses.replace(SPEC, test_speakers=(3, 24))


def test_records_are_grammatical_and_fit(builder):
  for split in SPLITS:
    for r in _records(builder, split):
      words = r["text"].decode().split(" ")
      assert grid_grammar.is_grammatical(words), words
      assert r["text"].decode() == " ".join(words)
      video = r["video"]
      assert video.dtype == np.uint8 and video.shape[1:] == (16, 16, 1)
      assert r["num_frames"] == video.shape[0] <= SPEC.max_frames
      assert r["id"].decode().startswith(f"{split}/s{r['speaker']:02d}/")


def test_grammar_and_slots():
  rng = np.random.default_rng(0)
  for _ in range(50):
    words = grid_grammar.sample_sentence(rng)
    assert [grid_grammar.slot_of_position(i) for i in range(6)] == list(grid_grammar.SLOT_NAMES)
    assert all(w in grid_grammar.SLOT_WORDS[grid_grammar.slot_of_position(i)]
               for i, w in enumerate(words))
  assert "w" not in grid_grammar.SLOT_WORDS["letter"] and len(grid_grammar.VOCABULARY) == 51


def test_look_alike_letters():
  v = visemes.word_to_visemes
  assert v("b") == v("p") and v("d") == v("t") and v("c") == v("z") and v("l") == v("n")
  assert v("a") != v("o") and v("m") != v("n")
  assert all(v(w) for w in grid_grammar.VOCABULARY)
  with_gap = visemes.sentence_to_visemes(["bin", "blue"], word_gap=True)
  assert with_gap == v("bin") + [visemes.SILENCE] + v("blue")
  assert visemes.sentence_to_visemes(["bin", "blue"], word_gap=False) == v("bin") + v("blue")
  assert 12 <= len(visemes.VISEMES) - 1 <= 14  # speech visemes plus silence


def _frame(viseme, speaker, spec):
  shapes = visemes.shapes_of([viseme])
  style = mouth_renderer.sample_speaker_style(spec, speaker)
  return mouth_renderer.render_frames(shapes, style, spec, np.random.default_rng(0))[0]


def test_renderer_varies_with_viseme_and_speaker():
  spec = dataclasses.replace(SyntheticLipsSpec(), **QUIET)
  diff = lambda a, b: np.abs(a.astype(np.float32) - b.astype(np.float32)).mean()
  assert diff(_frame("AA", 0, spec), _frame("PP", 0, spec)) > 8.0
  assert diff(_frame("UW", 0, spec), _frame("IH", 0, spec)) > 3.0
  assert diff(_frame("AA", 0, spec), _frame("AA", 24, spec)) > 3.0
  np.testing.assert_array_equal(_frame("AA", 0, spec), _frame("AA", 0, spec))


def test_shape_track_interpolates_between_visemes():
  track = mouth_renderer.shape_track(["PP", "AA", "PP"], [1, 3, 1])  # [5, P]
  openness = track[:, 0]
  assert openness.shape == (5,) and openness[0] == 0.0 and openness[2] == 1.0
  assert 0.0 < openness[1] < 1.0  # coarticulation: on the way to the open mouth


def test_long_timelines_shrink_to_max_frames():
  spec = dataclasses.replace(SPEC, max_frames=max_speech_visemes(), viseme_frames=(3, 3))
  for index in range(5):
    clip = synthetic_lips.generate_clip(spec, "train", index)
    assert clip["video"].shape[0] <= spec.max_frames
  d = synthetic_lips.fit_durations(np.array([3, 1, 3, 2]), np.array([1, 1, 1, 0]), 6)
  np.testing.assert_array_equal(d, [1, 1, 2, 2])  # longest first, first on ties
  with pytest.raises(ValueError, match="max_frames"):
    dataclasses.replace(SPEC, max_frames=max_speech_visemes() - 1)


def test_fingerprint_is_stable_and_sensitive():
  assert SyntheticLipsSpec().fingerprint() == SyntheticLipsSpec().fingerprint()
  assert SPEC.fingerprint() != dataclasses.replace(SPEC, pixel_noise_std=4.0).fingerprint()
  assert SPEC.fingerprint() in synthetic_lips.config_name(SPEC)


def test_module_can_be_imported_twice():
  importlib.reload(synthetic_lips)  # tfds registers builders by name; we must not clash
