"""The image_captions tfds builder on a tiny folder written with PIL.

The folder holds PNG/JPEG images (RGB, grayscale, RGBA), one corrupt file, a
manifest line whose image is missing and one with an empty caption; the
records, the per-split skip counts, their warnings, the order and the
fingerprinted config name are checked.
"""
from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
from PIL import Image

from tests.helpers.log_capture import CollectWarnings
from vsrllm_jax.data.datasets import image_captions as ic

SIZE = 8


def _write_folder(root):
  rng = np.random.default_rng(0)
  (root / "sub").mkdir(parents=True)
  Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(root / "a.png")
  Image.fromarray(rng.integers(0, 256, (40, 24), dtype=np.uint8), "L").save(root / "sub/b.jpg")
  Image.fromarray(rng.integers(0, 256, (12, 12, 4), dtype=np.uint8), "RGBA").save(root / "c.png")
  jpeg = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(jpeg, "JPEG")
  (root / "truncated.jpg").write_bytes(jpeg.getvalue()[:200])
  (root / "garbage.png").write_bytes(b"not an image at all")
  lines = [
      {"image": "a.png", "caption": "  a red square "},          # 1 train (default split)
      {"image": "sub/b.jpg", "caption": "grey", "split": "validation"},
      {"image": "truncated.jpg", "caption": "cut", "split": "train"},
      {"image": "missing.png", "caption": "gone"},
      {"image": "c.png", "caption": "   ", "split": "train"},  # 5 empty after strip
      {"image": "c.png", "caption": "alpha", "split": "test"},
      {"image": "a.png", "caption": "second caption"},          # 7 train
      {"image": "garbage.png", "caption": "junk", "split": "test"},
  ]
  text = "\n".join(json.dumps(line) for line in lines) + "\n\n"  # a blank line is ignored
  (root / ic.MANIFEST).write_text(text)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp("folder")
  _write_folder(root)
  handler = CollectWarnings()
  logger = logging.getLogger(ic.__name__)
  logger.addHandler(handler)
  try:
    builder = ic.prepare(root, SIZE, data_dir=tmp_path_factory.mktemp("data"))
  finally:
    logger.removeHandler(handler)
  return root, builder, handler.messages


def _records(builder, split):
  source = builder.as_data_source(split=split)
  return [source[i] for i in range(len(source))]


def _text(x):
  return x.decode() if isinstance(x, bytes) else str(x)


def test_records_keep_manifest_order_and_content(prepared):
  root, builder, _ = prepared
  train = _records(builder, "train")
  assert [_text(r["id"]) for r in train] == ["a.png#1", "a.png#7"]
  assert [_text(r["caption"]) for r in train] == ["a red square", "second caption"]
  want = ic.resize_image(ic.load_image(root / "a.png"), SIZE, "center_crop")
  for r in train:
    assert r["image"].dtype == np.uint8 and r["image"].shape == (SIZE, SIZE, 3)
    np.testing.assert_array_equal(r["image"], want)
    np.testing.assert_array_equal(r["original_size"], [20, 30])
  (grey,) = _records(builder, "validation")
  assert _text(grey["id"]) == "sub/b.jpg#2" and grey["image"].shape == (SIZE, SIZE, 3)
  assert (grey["image"][..., 0] == grey["image"][..., 2]).all()  # L converted to RGB
  (alpha,) = _records(builder, "test")
  assert _text(alpha["caption"]) == "alpha" and alpha["image"].shape == (SIZE, SIZE, 3)


def test_skips_are_counted_per_split_and_kind_and_warned(prepared):
  root, builder, messages = prepared
  assert ic.skip_counts(builder) == {
      "train": {"missing_image": 1, "corrupt_image": 1, "empty_caption": 1},
      "validation": {"missing_image": 0, "corrupt_image": 0, "empty_caption": 0},
      "test": {"missing_image": 0, "corrupt_image": 1, "empty_caption": 0}}
  assert {s: builder.info.splits[s].num_examples for s in ic.SPLITS} == {
      "train": 2, "validation": 1, "test": 1}
  for name, kind in (("truncated.jpg", "cannot decode"), ("garbage.png", "cannot decode"),
                     ("missing.png", "not found"), ("c.png", "empty caption")):
    assert any(str(root / name) in m and kind in m for m in messages), (name, messages)


def test_reload_and_rebuild_are_deterministic(prepared, tmp_path):
  root, builder, _ = prepared
  again = ic.ImageCaptions(manual_dir=root, image_size=SIZE, data_dir=builder.data_dir_root)
  assert again.is_prepared() and again.builder_config.name == builder.builder_config.name
  assert ic.skip_counts(again) == ic.skip_counts(builder)  # read back from disk
  rebuilt = ic.prepare(root, SIZE, data_dir=tmp_path)
  for split in ic.SPLITS:
    for a, b in zip(_records(builder, split), _records(rebuilt, split), strict=True):
      assert a.keys() == b.keys()
      for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_config_name_tracks_manifest_and_preprocessing(prepared, tmp_path):
  root, builder, _ = prepared
  name = builder.builder_config.name
  assert name.startswith(f"s{SIZE}_center_crop_")
  assert ic.config_name(root, SIZE + 1, "center_crop") != name
  assert ic.config_name(root, SIZE, "squash") != name
  copy = tmp_path / "copy"
  copy.mkdir()
  (copy / ic.MANIFEST).write_text((root / ic.MANIFEST).read_text())
  assert ic.config_name(copy, SIZE, "center_crop") == name   # the path is not part of it
  (copy / ic.MANIFEST).write_text((root / ic.MANIFEST).read_text() + '{"image": "a.png", '
                                  '"caption": "more"}\n')
  assert ic.config_name(copy, SIZE, "center_crop") != name


def test_resize_modes():
  stripes = np.zeros((8, 16, 3), np.uint8)
  stripes[:, 4:12] = 255                                  # white centre, black quarters
  image = Image.fromarray(stripes)
  assert (ic.resize_image(image, 8, "center_crop") == 255).all()
  squashed = ic.resize_image(image, 8, "squash")
  assert squashed[:, 0].max() < 64 and squashed[:, 4].min() > 192
  with pytest.raises(ValueError, match="resize mode"):
    ic.resize_image(image, 8, "stretch")


@pytest.mark.parametrize("line,message", [
    ("{not json", r"captions.jsonl:2: not valid JSON"),
    ('{"caption": "no image"}', r"captions.jsonl:2: expected an object with a non-empty string"),
    ('{"image": "a.png", "caption": "x", "split": "dev"}', r"captions.jsonl:2: 'split' = 'dev'"),
    ('{"image": "/abs/a.png", "caption": "x"}', r"captions.jsonl:2: 'image' = '/abs/a.png'"),
])
def test_malformed_manifest_lines_raise_naming_the_line(tmp_path, line, message):
  (tmp_path / ic.MANIFEST).write_text('{"image": "a.png", "caption": "ok"}\n' + line + "\n")
  with pytest.raises(ValueError, match=message):
    ic.read_manifest(tmp_path)


def test_missing_manifest_and_all_skipped_split(tmp_path):
  with pytest.raises(FileNotFoundError, match="captions.jsonl"):
    ic.ImageCaptions(manual_dir=tmp_path, image_size=SIZE)
  (tmp_path / "a.png").write_bytes(b"broken")
  (tmp_path / ic.MANIFEST).write_text('{"image": "a.png", "caption": "x"}\n')
  with pytest.raises(ValueError, match="every one of the 1 lines of split 'train' was skipped"):
    ic.prepare(tmp_path, SIZE, data_dir=tmp_path / "data")


def test_prepare_and_read_without_tensorflow(tmp_path):
  from tests.helpers import no_tf  # pylint: disable=g-import-not-at-top
  code = f"""
import json, pathlib
import numpy as np
from PIL import Image
from vsrllm_jax.data.datasets import image_captions as ic
root = pathlib.Path({str(tmp_path)!r})
Image.fromarray(np.full((10, 12, 3), 7, np.uint8)).save(root / "a.png")
(root / "captions.jsonl").write_text(json.dumps({{"image": "a.png", "caption": "x"}}) + "\\n")
record = ic.prepare(root, 8, data_dir=root / "data").as_data_source("train")[0]
assert record["image"].shape == (8, 8, 3) and (record["image"] == 7).all()
caption = record["caption"]
print("READ", caption.decode() if isinstance(caption, bytes) else caption)
"""
  proc = no_tf.run_without_tensorflow(code, cwd=no_tf.REPO_ROOT, timeout=300,
                                      env={"JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0 and "READ x" in proc.stdout, proc.stderr[-3000:]
