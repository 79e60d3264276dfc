"""lrs3_manifest builder on a real-mp4 LRS3-like tree; tasks; AV-HuBERT preprocessing."""
from __future__ import annotations

import collections
import logging
import os
import pickle
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tests.helpers.log_capture import CollectWarnings
from vsrllm_jax.data import avhubert_preprocess as pre
from tests.helpers import lrs3_fixture
from vsrllm_jax.data.synthetic import lrs3_layout
from vsrllm_jax.data.datasets import lrs3
from vsrllm_jax.data.datasets import lrs3_files
from vsrllm_jax.data import tasks
from vsrllm_jax.models.encoders import video_encoder

TASK_CYCLE = ("vsr", "vst_es", "vst_fr", "vst_it", "vst_pt")
# train clip index -> how it is broken (index 3 gets 64x64 frames instead)
BROKEN = {1: "missing_file", 4: "not_a_video", 6: "corrupt_video", 7: "truncated_video",
          9: "frame_count_mismatch", 11: "cluster_counts_mismatch", 13: "empty_transcript"}
WRONG_SIZE = 3
NUM_TRAIN = 16  # 8 bad: max_bad_fraction=0.5 is exactly enough


def _frames(rng, length, size=96):
  y, x = np.mgrid[:size, :size]
  base = [128 + 90 * np.sin((x + 2 * t) / 6.0) * np.cos((y - t) / 9.0) for t in range(length)]
  return np.clip(np.round(base + rng.normal(0, 5, (length, size, size))), 0, 255).astype(
      np.uint8)


def _counts(rng, length):
  ends = np.unique(np.minimum(np.cumsum(rng.integers(1, 4, size=length)), length))
  return np.diff(np.concatenate([[0], ends])).tolist()


def _clips(split, n, rng, *, pair_only_ids=False, with_counts=True):
  out = []
  for i in range(n):
    length = 10 + i % 4
    frames = _frames(rng, length, 64 if (split == "train" and i == WRONG_SIZE) else 96)
    src, tgt = tasks.language_pair(TASK_CYCLE[i % len(TASK_CYCLE)])
    ident = f"lrs3/{src}-{tgt}" if pair_only_ids else f"lrs3/{src}-{tgt}/{split}_{i:03d}"
    out.append((ident, frames, f"{split} words number {i}",
                _counts(rng, length) if with_counts else None))
  return out


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp("lrs3")
  manual = root / "manual"
  rng = np.random.default_rng(0)
  clips = {"train": _clips("train", NUM_TRAIN, rng),
           "valid": _clips("valid", 3, rng, with_counts=False),
           "test": _clips("test", 3, rng, pair_only_ids=True)}
  trees = {s: lrs3_layout.write_lrs3_like_tree(manual, c, s) for s, c in clips.items()}
  for index, kind in BROKEN.items():
    lrs3_fixture.break_sample(trees["train"], index, kind)
  handler = CollectWarnings()
  logger = logging.getLogger(lrs3.__name__)
  logger.addHandler(handler)
  try:
    opts = lrs3.Lrs3ManifestOptions(manual_dir=str(manual), max_bad_fraction=0.5)
    builders = {
        "a": lrs3.prepare(opts, root / "data_a"),
        "b": lrs3.prepare(opts, root / "data_b"),
        "frames": lrs3.prepare(
            lrs3.Lrs3ManifestOptions(manual_dir=str(manual), max_bad_fraction=0.5,
                                              storage="frames"), root / "data_f")}
  finally:
    logger.removeHandler(handler)
  return {"root": root, "manual": manual, "clips": clips, "trees": trees,
          "builders": builders, "warnings": handler.messages}


def _records(builder, split):
  source = builder.as_data_source(split=split)
  return [source[i] for i in range(len(source))]


def _text(value):
  return value.decode() if isinstance(value, bytes) else str(value)


def test_records_match_the_source_clips(built):
  good = [i for i in range(NUM_TRAIN) if i not in BROKEN and i != WRONG_SIZE]
  records = _records(built["builders"]["a"], "train")
  assert [_text(r["id"]) for r in records] == [built["clips"]["train"][i][0] for i in good]
  for i, record in zip(good, records):
    ident, frames, text, counts = built["clips"]["train"][i]
    assert "video" not in record and record["video_mp4"].dtype == np.uint8  # mp4 storage
    decoded = lrs3.decode_record(record)
    assert decoded["video"].shape == frames.shape + (1,) and decoded["video"].dtype == np.uint8
    assert np.abs(decoded["video"][..., 0].astype(int) - frames).max() <= 1  # crf 0
    assert int(record["num_frames"]) == len(frames)
    assert _text(record["text"]) == text
    assert _text(record["task"]) == TASK_CYCLE[i % len(TASK_CYCLE)]
    np.testing.assert_array_equal(record["cluster_counts"], counts)


def test_frames_storage_holds_the_same_decoded_frames(built):
  mp4 = _records(built["builders"]["a"], "train")
  frames = _records(built["builders"]["frames"], "train")
  assert len(mp4) == len(frames)
  for a, b in zip(mp4, frames):
    np.testing.assert_array_equal(lrs3.decode_record(a)["video"], b["video"])
    assert lrs3.decode_record(b) is b
  names = {k: b.builder_config.name for k, b in built["builders"].items()}
  assert names["a"] == names["b"] != names["frames"]
  assert names["a"].startswith("mp4_s96_") and names["frames"].startswith("frames_s96_")


def test_skip_counts_per_kind(built):
  reports = lrs3.read_bad_samples(built["builders"]["a"])
  assert set(reports) == {"train", "validation", "test"}
  expected = collections.Counter(lrs3_fixture.SKIP_KIND_OF[k] for k in BROKEN.values())
  expected[lrs3.WRONG_FRAME_SIZE] += 1
  train = reports["train"]
  assert train["skipped"] == {k: expected.get(k, 0) for k in lrs3.SKIP_KINDS}
  assert (train["total"], train["kept"]) == (NUM_TRAIN, NUM_TRAIN - 8)
  videos = built["trees"]["train"]["videos"]
  by_video = {s["video"]: s["kind"] for s in train["samples"]}
  assert by_video == {videos[i]: lrs3_fixture.SKIP_KIND_OF.get(BROKEN.get(i), "wrong_frame_size")
                      for i in list(BROKEN) + [WRONG_SIZE]}
  assert all(sum(r["skipped"].values()) == 0 for s, r in reports.items() if s != "train")
  for video in by_video:  # a warning naming the file, in each of the 3 builds
    assert sum(video in m for m in built["warnings"]) == 3


def test_splits_without_counts_and_with_pair_only_ids(built):
  valid = _records(built["builders"]["a"], "validation")
  assert [int(r["num_frames"]) for r in valid] == [10, 11, 12]
  for r in valid:  # no .cluster_counts file: one run per frame
    np.testing.assert_array_equal(r["cluster_counts"], np.ones(int(r["num_frames"])))
  test = _records(built["builders"]["a"], "test")
  # VSP-LLM's released ids are just "lrs3/en-fr": the video path makes them unique.
  assert [_text(r["id"]) for r in test] == [
      "lrs3/en-en/video/test/00000", "lrs3/en-es/video/test/00001",
      "lrs3/en-fr/video/test/00002"]
  assert [_text(r["task"]) for r in test] == ["vsr", "vst_es", "vst_fr"]


def test_deterministic_across_builds_and_picklable(built):
  for split in ("train", "validation", "test"):
    a, b = _records(built["builders"]["a"], split), _records(built["builders"]["b"], split)
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
      assert x.keys() == y.keys()
      for key in x:
        np.testing.assert_array_equal(x[key], y[key])
  source = built["builders"]["a"].as_data_source(split="train")
  np.testing.assert_array_equal(pickle.loads(pickle.dumps(source))[2]["video_mp4"],
                                source[2]["video_mp4"])
  # A prepared copy reads without the manual_dir (e.g. on another machine).
  again = tfds.builder_from_directory(built["builders"]["a"].data_dir)
  np.testing.assert_array_equal(again.as_data_source(split="train")[2]["video_mp4"],
                                source[2]["video_mp4"])


def test_max_bad_fraction_is_an_error(built, tmp_path):
  opts = lrs3.Lrs3ManifestOptions(manual_dir=str(built["manual"]),
                                           max_bad_fraction=0.4, splits=(("train", "train"),))
  with pytest.raises(lrs3.TooManyBadSamplesError,
                     match=r"7 of 16 samples are bad.*max_bad_fraction=0.4"):
    lrs3.prepare(opts, tmp_path)
  assert not os.path.exists(tmp_path / "lrs3_manifest" / lrs3.config_name(opts) /
                            "1.0.0" / "dataset_info.json")


def test_fingerprint_follows_the_manifest(built, tmp_path):
  manual = tmp_path / "copy"
  shutil.copytree(built["manual"], manual)
  opts = lrs3.Lrs3ManifestOptions(manual_dir=str(manual))
  same = lrs3.config_name(opts)
  assert same == built["builders"]["a"].builder_config.name  # content, not location
  with open(manual / "valid.wrd", "a", encoding="utf-8") as f:
    f.write("")
  assert lrs3.config_name(opts) == same
  lines = (manual / "valid.wrd").read_text().split("\n")
  (manual / "valid.wrd").write_text("\n".join(["changed"] + lines[1:]))
  assert lrs3.config_name(opts) != same
  assert lrs3.config_name(
      lrs3.Lrs3ManifestOptions(manual_dir=str(manual), max_bad_fraction=0.2)
  ) == lrs3.config_name(opts)


def _write(path, text):
  path.write_text(text, encoding="utf-8")


@pytest.mark.parametrize("tsv, wrd, counts, error, message", [
    ("/r\nlrs3/en-en/a\ta.mp4\ta.wav\t3\t1920\n", "", None, ValueError,
     r"train.wrd has 0 lines but .*train.tsv has 1 rows"),
    ("/r\nlrs3/en-en/a\ta.mp4\ta.wav\t3\n", "x\n", None, ValueError,
     r"train.tsv:2: expected 5 tab-separated columns"),
    ("/r\nlrs3/en-en/a\ta.mp4\ta.wav\tthree\t1920\n", "x\n", None, ValueError,
     r"train.tsv:2: n_video_frames 'three'"),
    ("/r\nlrs3/en-en/a\ta.mp4\ta.wav\t3\t1\nlrs3/en-en/a\tb.mp4\tb.wav\t3\t1\n", "x\ny\n",
     None, ValueError, r"lines 2 and 3 have the same id 'lrs3/en-en/a'"),
    ("/r\nlrs3/en-en/a\ta.mp4\ta.wav\t3\t1920\n", "x\n", "1 x 1\n", ValueError,
     r"train.cluster_counts:1: expected space-separated positive integers"),
    ("/r\nlrs3/en-en/a\ta.mp4\ta.wav\t3\t1920\n", "x\n", "1 1 1\n2 1\n", ValueError,
     r"train.cluster_counts has 2 lines"),
    ("\nlrs3/en-en/a\ta.mp4\ta.wav\t3\t1920\n", "x\n", None, ValueError,
     r"train.tsv:1: expected the root directory"),
])
def test_malformed_manifests_name_the_file(tmp_path, tsv, wrd, counts, error, message):
  _write(tmp_path / "train.tsv", tsv)
  _write(tmp_path / "train.wrd", wrd)
  if counts is not None:
    _write(tmp_path / "train.cluster_counts", counts)
  with pytest.raises(error, match=message):
    lrs3_files.read_split(tmp_path, "train")


def test_manifest_level_errors_in_the_builder(tmp_path):
  with pytest.raises(FileNotFoundError, match="manual_dir"):
    lrs3.Lrs3ManifestOptions(manual_dir=str(tmp_path / "nowhere"))
  with pytest.raises(ValueError, match="storage='png'"):
    lrs3.Lrs3ManifestOptions(manual_dir=str(tmp_path), storage="png")
  _write(tmp_path / "train.tsv", "/r\nlrs3/en-de/x\ta.mp4\ta.wav\t3\t1920\n")
  _write(tmp_path / "train.wrd", "hallo\n")
  opts = lrs3.Lrs3ManifestOptions(manual_dir=str(tmp_path),
                                           splits=(("train", "train"),))
  with pytest.raises(ValueError, match=r"train.tsv:2: manifest id 'lrs3/en-de/x': language "
                     r"pair 'en-de' has no task"):
    lrs3.prepare(opts, tmp_path / "data")
  with pytest.raises(FileNotFoundError, match=r"valid.tsv not found"):
    lrs3.prepare(lrs3.Lrs3ManifestOptions(
        manual_dir=str(tmp_path), splits=(("validation", "valid"),)), tmp_path / "data")
  with pytest.raises(FileNotFoundError, match=r"train.cluster_counts not found"):
    lrs3_files.read_split(tmp_path, "train", require_cluster_counts=True)


@pytest.mark.parametrize("manifest_id, task, instruction", [
    ("lrs3/en-en/abc/00001", "vsr", "Recognize this speech in English. Input : "),
    ("lrs3/en-es", "vst_es", "Translate this English speech to Spanish. Input : "),
    ("lrs3/en-fr/x", "vst_fr", "Translate this English speech to French. Input : "),
    ("lrs3/en-it/x", "vst_it", "Translate this English speech to Italian. Input : "),
    ("lrs3/en-pt/x", "vst_pt", "Translate this English speech to Portuguese. Input : "),
])
def test_tasks_and_vsp_llm_instructions(manifest_id, task, instruction):
  assert tasks.task_from_id(manifest_id) == task
  assert tasks.instruction(task) == instruction
  assert tasks.instructions()[task] == instruction


def test_unknown_tasks_name_the_id():
  with pytest.raises(ValueError, match=r"'lrs3/en-de/c'.*'en-de' has no task"):
    tasks.task_from_id("lrs3/en-de/c")
  with pytest.raises(ValueError, match=r"'lrs3/clip' has no language-pair component"):
    tasks.task_from_id("lrs3/clip")
  with pytest.raises(ValueError, match="unknown task 'asr'"):
    tasks.instruction("asr")


def _position_clip(length=6, size=96):
  """frames[t, y, x] encodes (y, x) so a crop reveals its offset; channel axis kept."""
  y, x = np.mgrid[:size, :size]
  return np.broadcast_to((y * size + x)[None, ..., None], (length, size, size, 1)).copy()


def test_center_and_random_crop_positions():
  clip = _position_clip()
  center = pre.center_crop(clip)
  assert center.shape == (6, 88, 88, 1) and center[0, 0, 0, 0] == 4 * 96 + 4
  offsets = set()
  for seed in range(300):
    crop = pre.random_crop(clip, np.random.default_rng(seed))
    top, left = divmod(int(crop[0, 0, 0, 0]), 96)
    rng = np.random.default_rng(seed)  # the same two draws, in order
    assert (top, left) == (int(rng.integers(0, 8, endpoint=True)),
                           int(rng.integers(0, 8, endpoint=True)))
    np.testing.assert_array_equal(crop, clip[:, top:top + 88, left:left + 88])
    offsets.add((top, left))
  assert {t for t, _ in offsets} == set(range(9)) == {l for _, l in offsets}
  with pytest.raises(ValueError, match="crop_size=100 does not fit frames of 96x96"):
    pre.center_crop(clip, 100)


def test_flip_probability_and_content():
  clip = _position_clip(length=2)
  flips = 0
  for seed in range(400):
    out = pre.horizontal_flip(clip, np.random.default_rng(seed))
    flipped = bool(out[0, 0, 0, 0] != 0)
    np.testing.assert_array_equal(out, clip[:, :, ::-1] if flipped else clip)
    flips += flipped
  assert 160 < flips < 240  # p = 0.5, 400 draws: mean 200, sd 10
  for seed in range(20):
    np.testing.assert_array_equal(
        pre.horizontal_flip(clip, np.random.default_rng(seed), prob=0.0), clip)


def test_normalisation_statistics():
  assert (pre.PIXEL_MEAN, pre.PIXEL_STD) == (video_encoder.PIXEL_MEAN, video_encoder.PIXEL_STD)
  frames = np.random.default_rng(0).integers(0, 256, (4, 96, 96), dtype=np.uint8)
  out = pre.normalize(frames)
  assert out.dtype == np.float32
  scaled = frames / 255.0
  np.testing.assert_allclose(out.mean(), (scaled.mean() - 0.421) / 0.165, rtol=1e-5)
  np.testing.assert_allclose(out.std(), scaled.std() / 0.165, rtol=1e-4)
  np.testing.assert_allclose(pre.normalize(np.full((1, 2, 2), 255, np.uint8)),
                             (1 - 0.421) / 0.165, rtol=1e-6)
  assert abs(float(pre.normalize(np.full((1, 1, 1), pre.MEAN_GRAY, np.uint8)).item())) < 0.02


def test_time_mask_spans():
  frames = np.random.default_rng(0).integers(0, 256, (40, 8, 8), dtype=np.uint8)
  for seed in range(50):
    out, mask = pre.time_mask(frames, np.random.default_rng(seed), mask_prob=0.5, mask_span=5)
    rng = np.random.default_rng(seed)
    count = int(0.5 * 40 / 5 + rng.random())  # 4 spans, starts without replacement
    starts = rng.choice(36, size=count, replace=False)
    expected = np.zeros(40, bool)
    for s in starts:
      expected[s:s + 5] = True
    np.testing.assert_array_equal(mask, expected)
    assert (out[mask] == pre.MEAN_GRAY).all()
    np.testing.assert_array_equal(out[~mask], frames[~mask])
    runs = np.diff(np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]]).astype(int))))[::2]
    assert (runs >= 5).all() and 5 <= mask.sum() <= 20
  out, mask = pre.time_mask(pre.normalize(frames), np.random.default_rng(1), mask_prob=0.3)
  assert mask.any() and (out[mask] == 0.0).all()
  short, mask = pre.time_mask(frames[:3], np.random.default_rng(0), mask_prob=1.0, mask_span=10)
  assert mask.all()  # span capped at T
  _, none = pre.time_mask(frames, np.random.default_rng(0), mask_prob=0.0)
  assert not none.any()


def test_preprocess_is_deterministic_given_the_rng():
  frames = np.random.default_rng(0).integers(0, 256, (20, 96, 96, 1), dtype=np.uint8)
  kwargs = dict(train=True, mask_prob=0.3, mask_span=4)
  a = pre.preprocess(frames, np.random.default_rng(7), **kwargs)
  b = pre.preprocess(frames, np.random.default_rng(7), **kwargs)
  assert a.shape == (20, 88, 88, 1) and a.dtype == np.float32
  np.testing.assert_array_equal(a, b)
  others = [pre.preprocess(frames, np.random.default_rng(s), **kwargs) for s in range(3)]
  assert any(not np.array_equal(a, o) for o in others)
  np.testing.assert_array_equal(pre.preprocess(frames, train=False),
                                pre.normalize(pre.center_crop(frames)))
  with pytest.raises(ValueError, match="needs an rng"):
    pre.preprocess(frames, train=True)
