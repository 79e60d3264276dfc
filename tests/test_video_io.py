"""video_io: real mp4 round trips, grayscale conversion, typed errors per broken file."""
from __future__ import annotations

import re

import av
import numpy as np
import pytest

from tests.helpers import lrs3_fixture
from vsrllm_jax.data.synthetic import lrs3_layout
from vsrllm_jax.data import video_io


def _pattern(frames=12, size=96, seed=0):
  """Moving smooth pattern plus mild noise, full 0..255 range."""
  y, x = np.mgrid[:size, :size]
  rng = np.random.default_rng(seed)
  out = [127.5 + 127.5 * np.sin((x + 3 * t) / 7.0) * np.cos((y - 2 * t) / 11.0)
         + rng.normal(0, 4, (size, size)) for t in range(frames)]
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
  frames = _pattern()
  path = tmp_path_factory.mktemp("video") / "clip.mp4"
  video_io.write_video(path, frames)
  return path, frames


def test_lossless_round_trip_matches_swscale_gray(clip):
  path, frames = clip
  got = video_io.read_video(path)
  assert got.dtype == np.uint8 and got.shape == frames.shape
  # crf 0 is lossless in yuv420p; only the full -> limited -> full luma range rounding remains.
  assert np.abs(got.astype(int) - frames).max() <= 1
  with av.open(str(path)) as container:
    reference = np.stack([f.to_ndarray(format="gray") for f in container.decode(video=0)])
  np.testing.assert_array_equal(got, reference)  # our fast luma path == ffmpeg's gray
  np.testing.assert_array_equal(video_io.decode_video_bytes(path.read_bytes()), got)


def test_probe(clip):
  path, frames = clip
  info = video_io.probe_video(path)
  assert (info.num_frames, info.height, info.width) == frames.shape
  assert info.fps == 25 and info.codec == "h264" and info.pix_fmt == "yuv420p"
  assert "mp4" in info.container


def test_rgb_and_channel_inputs_become_bt601_luma(tmp_path):
  gray = _pattern(frames=4)
  rgb = np.stack([gray, np.roll(gray, 5, axis=2), gray // 2], axis=-1)
  video_io.write_video(tmp_path / "rgb.mp4", rgb)
  luma = np.round(rgb.astype(np.float32) @ np.asarray([0.299, 0.587, 0.114], np.float32))
  assert np.abs(video_io.read_video(tmp_path / "rgb.mp4") - luma).max() <= 1
  video_io.write_video(tmp_path / "c1.mp4", gray[..., None])
  assert np.abs(video_io.read_video(tmp_path / "c1.mp4").astype(int) - gray).max() <= 1


def test_gray_frame_per_pixel_format():
  gray = _pattern(frames=1, size=32)[0]
  frame = av.VideoFrame.from_ndarray(gray, format="gray")
  np.testing.assert_array_equal(video_io.gray_frame(frame), gray)  # full range: as is
  limited = frame.reformat(format="yuv420p")  # swscale compresses luma to 16..235
  y = np.frombuffer(limited.planes[0], np.uint8).reshape(32, -1)[:, :32]
  assert y.min() >= 16 and y.max() <= 235
  assert np.abs(video_io.gray_frame(limited).astype(int) - gray).max() <= 1
  rgb = np.stack([gray, 255 - gray, gray // 3], axis=-1)
  expected = np.round(rgb.astype(np.float32) @ np.asarray([0.299, 0.587, 0.114], np.float32))
  got = video_io.gray_frame(av.VideoFrame.from_ndarray(rgb, format="rgb24"))
  np.testing.assert_array_equal(got, expected)


def test_mpeg4_fallback_codec(tmp_path):
  frames = _pattern(frames=6)
  video_io.write_video(tmp_path / "m.mp4", frames, codec="mpeg4")
  assert video_io.probe_video(tmp_path / "m.mp4").codec == "mpeg4"
  assert np.abs(video_io.read_video(tmp_path / "m.mp4").astype(int) - frames).max() <= 8


def test_lossy_crf_is_close_and_smaller(tmp_path, clip):
  path, frames = clip
  video_io.write_video(tmp_path / "lossy.mp4", frames, crf=23)
  got = video_io.read_video(tmp_path / "lossy.mp4")
  assert np.abs(got.astype(float) - frames).mean() < 6
  assert (tmp_path / "lossy.mp4").stat().st_size < path.stat().st_size / 2


@pytest.mark.parametrize("kind, error", [
    ("missing_file", video_io.VideoMissingError),
    ("not_a_video", video_io.NotAVideoError),
    ("corrupt_video", video_io.CorruptVideoError),
    ("truncated_video", video_io.CorruptVideoError),
])
def test_broken_files_raise_typed_errors_naming_the_file(tmp_path, kind, error):
  tree = lrs3_layout.write_lrs3_like_tree(
      tmp_path, [("lrs3/en-en/a", _pattern(frames=10), "a", None)])
  lrs3_fixture.break_sample(tree, 0, kind)
  path = tree["videos"][0]
  with pytest.raises(error, match=re.escape(path)) as info:
    video_io.read_video(path)
  assert info.value.kind == lrs3_fixture.SKIP_KIND_OF[kind] and info.value.path == path
  assert isinstance(info.value, (FileNotFoundError, ValueError))


def test_more_broken_inputs(tmp_path):
  (tmp_path / "empty.mp4").write_bytes(b"")
  with pytest.raises(video_io.CorruptVideoError, match="empty file"):
    video_io.read_video(tmp_path / "empty.mp4")
  with pytest.raises(video_io.NotAVideoError, match="not a regular file"):
    video_io.read_video(tmp_path)
  with av.open(str(tmp_path / "a.wav"), "w") as container:  # audio only
    stream = container.add_stream("pcm_s16le", rate=16000)
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 1600), np.int16), format="s16",
                                       layout="mono")
    frame.sample_rate = 16000
    for packet in list(stream.encode(frame)) + list(stream.encode()):
      container.mux(packet)
  with pytest.raises(video_io.NotAVideoError, match="a.wav"):
    video_io.read_video(tmp_path / "a.wav")
  # Index first: a truncated file still opens, then decodes short.
  frames = _pattern(frames=30)
  video_io.write_video(tmp_path / "fs.mp4", frames, faststart=True)
  data = (tmp_path / "fs.mp4").read_bytes()
  assert data.find(b"moov") < data.find(b"mdat")
  (tmp_path / "fs.mp4").write_bytes(data[:len(data) * 2 // 3])
  with pytest.raises(video_io.CorruptVideoError, match="fs.mp4"):
    video_io.read_video(tmp_path / "fs.mp4")


@pytest.mark.parametrize("frames, message", [
    (np.zeros((3, 95, 96), np.uint8), "even H and W"),
    (np.zeros((3, 96, 96), np.float32), "expected uint8"),
    (np.zeros((0, 96, 96), np.uint8), "expected uint8"),
    (np.zeros((3, 96, 96, 2), np.uint8), "expected uint8"),
])
def test_write_video_rejects_bad_frames(tmp_path, frames, message):
  with pytest.raises(ValueError, match=message):
    video_io.write_video(tmp_path / "x.mp4", frames)
