"""Encoder pretraining: checkpoint round trip, masked train-mode batch norm, frozen
path unchanged, and a reduced-budget pretraining that reads lips of unseen speakers."""
from __future__ import annotations

import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from vsrllm_jax.configs.common import get_base_config
from tests.helpers.numerics import assert_close
from tests.helpers.tiny import small_data_config
from vsrllm_jax.data.synthetic import synthetic_lips
from vsrllm_jax.data.synthetic import visemes
from vsrllm_jax.data.synthetic.spec import SyntheticLipsSpec
from vsrllm_jax.formats import encoder_dir
from vsrllm_jax.models import encoders

COMPACT = encoders.KINDS.get("compact")
from vsrllm_jax.models.encoders.video_encoder import StemConv, VideoEncoder, VideoEncoderConfig
from vsrllm_jax.tools import pretrain_encoder

SMALL = VideoEncoderConfig(stem_channels=4, resnet_channels=(4, 8, 8, 8),
                           resnet_blocks=(1, 1, 1, 1), hidden_dim=16, num_layers=1, num_heads=2,
                           mlp_dim=32)
# Reduced budget below, measured (seed 0, CPU, deterministic): held-out train 0.666,
# validation 0.672, test 0.656 frame accuracy; always guessing silence scores ~0.22.
MIN_UNSEEN_ACCURACY = 0.55


def _clips(batch, frames, seed=0, size=16):
  rng = np.random.default_rng(seed)
  video = rng.integers(0, 255, (batch, frames, size, size, 1)).astype(np.uint8)
  lengths = rng.integers(frames // 2, frames + 1, batch)
  mask = np.arange(frames)[None] < lengths[:, None]
  return video * mask[:, :, None, None, None].astype(np.uint8), mask


def _init(config, seed=0):
  """Random variables of ``config`` from numpy (a jitted flax init compiles for ~10 s).

  Running averages are non-trivial, so that eval mode visibly uses them.
  """
  rng = np.random.default_rng(seed)
  tensors = {}
  for key, shape in COMPACT.variable_shapes(config).items():
    value = rng.normal(0.0, 0.3, shape)
    if key.endswith(("/var", "/scale")):
      value = 1.0 + np.abs(value)
    tensors[key] = value.astype(np.float32)
  return encoder_dir.unflatten(tensors)


def test_save_load_round_trip_is_exact(tmp_path):
  variables = _init(SMALL)
  COMPACT.save(tmp_path / "enc", SMALL, variables)
  assert sorted(p.name for p in (tmp_path / "enc").iterdir()) == ["config.json",
                                                                 "model.safetensors"]
  assert json.loads((tmp_path / "enc" / "config.json").read_text())["format"] == encoder_dir.FORMAT
  config, loaded = encoders.load_directory(tmp_path / "enc")
  assert config == SMALL
  assert jax.tree.structure(loaded) == jax.tree.structure(variables)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(variables)):
    assert a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
  # Overwriting is atomic and leaves no temporary directories behind.
  COMPACT.save(tmp_path / "enc", SMALL, variables)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["enc"]


def test_load_errors_name_the_problem(tmp_path):
  variables = _init(SMALL)
  COMPACT.save(tmp_path / "enc", SMALL, variables)
  (tmp_path / "enc" / "model.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    encoders.load_directory(tmp_path / "enc")
  with pytest.raises(FileNotFoundError, match="config.json"):
    encoders.load_directory(tmp_path / "nowhere")
  # Weights of another shape under this config: the message names the key.
  other = VideoEncoderConfig(**{**SMALL.__dict__, "hidden_dim": 32, "mlp_dim": 64})
  COMPACT.save(tmp_path / "other", other, _init(other))
  cfg_file = tmp_path / "other" / "config.json"
  cfg_file.write_text((tmp_path / "enc" / "config.json").read_text())
  with pytest.raises(ValueError, match="frontend_proj/kernel"):
    encoders.load_directory(tmp_path / "other")
  with pytest.raises(ValueError, match="missing keys"):
    COMPACT.save(tmp_path / "x", SMALL, {"params": {}, "batch_stats": {}})


@jax.jit
def _train_apply(variables, video, mask):
  """Train mode: (features, updated batch_stats)."""
  features, updates = VideoEncoder(SMALL).apply(variables, video, mask, train=True,
                                                mutable=["batch_stats"])
  return features, updates["batch_stats"]


def test_train_mode_batch_stats_ignore_padding():
  video, mask = _clips(3, 10)
  variables = _init(SMALL)
  pad = 7
  video_p = np.concatenate([video, np.zeros((3, pad) + video.shape[2:], np.uint8)], 1)
  mask_p = np.concatenate([mask, np.zeros((3, pad), bool)], 1)
  (feats, base), (feats_p, padded) = (_train_apply(variables, video, mask),
                                      _train_apply(variables, video_p, mask_p))
  for a, b, before in zip(jax.tree.leaves(base), jax.tree.leaves(padded),
                          jax.tree.leaves(variables["batch_stats"])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert not np.allclose(a, before)  # the running averages did move
  # Train-mode features of real frames do not depend on padding either.
  np.testing.assert_allclose(np.asarray(feats_p)[:, :10][mask], np.asarray(feats)[mask],
                             rtol=1e-4, atol=1e-4)


def test_frozen_path_uses_running_averages_and_the_3d_stem():
  video, mask = _clips(3, 9)
  variables = _init(SMALL)
  model = VideoEncoder(SMALL)
  frozen = jax.jit(lambda v, x, m: model.apply(v, x, m))   # how vsr_model calls it
  explicit = jax.jit(lambda v, x, m: model.apply(v, x, m, train=False))
  default = np.asarray(frozen(variables, video, mask))
  np.testing.assert_array_equal(default, np.asarray(explicit(variables, video, mask)))
  # Running averages, not batch statistics: a clip's features do not depend on
  # the other clips of the batch.
  alone = np.asarray(frozen(variables, video[:1], mask[:1]))
  np.testing.assert_allclose(alone[0], default[0], rtol=1e-5, atol=1e-5)
  # The stem is exactly the 3-D convolution the encoder always had (same
  # parameter name and shape as nn.Conv).
  x = np.random.default_rng(1).normal(size=(2, 6, 16, 16, 1)).astype(np.float32)
  stem_vars = {"params": {"kernel": np.random.default_rng(2).normal(
      size=(5, 7, 7, 1, 4)).astype(np.float32)}}
  conv3d = nn.Conv(4, (5, 7, 7), (1, 2, 2), padding=((2, 2), (3, 3), (3, 3)), use_bias=False)
  assert_close(StemConv(4).apply(stem_vars, x), conv3d.apply(stem_vars, x), rtol=1e-5,
               atol_frac=1e-6)


def test_viseme_ids_match_the_timeline():
  spec = SyntheticLipsSpec(image_size=16, max_frames=48, train_clips=4, validation_clips=1,
                           test_clips=1)
  clip = synthetic_lips.generate_clip(spec, "train", 2)
  ids = clip["viseme_ids"]
  assert ids.dtype == np.int32 and ids.shape == (clip["num_frames"],)
  rng = synthetic_lips.clip_rng(spec, "train", 2)
  rng.integers(len(spec.speakers("train")))
  words = synthetic_lips.grid_grammar.sample_sentence(rng)
  seq, durations = synthetic_lips.sample_timeline(spec, words, rng)
  expected = [visemes.VISEME_INDEX[v] for v, d in zip(seq, durations) for _ in range(d)]
  np.testing.assert_array_equal(ids, expected)
  assert ids[0] == visemes.VISEME_INDEX[visemes.SILENCE]


@pytest.fixture(scope="module")
def reduced_data(tmp_path_factory):
  return small_data_config(tmp_path_factory.mktemp("data"), image_size=32, max_frames=64,
                           train_clips=240, validation_clips=40, test_clips=40)


def test_reduced_pretraining_reads_unseen_speakers(reduced_data, tmp_path):
  encoder_cfg = VideoEncoderConfig.from_config_dict(get_base_config().encoder)
  metrics = pretrain_encoder.pretrain_encoder(
      reduced_data, encoder_cfg, steps=100, batch_size=8, learning_rate=3e-3, seed=0,
      crop_frames=24, out_dir=tmp_path / "enc", heldout_train_clips=40)
  print(metrics)
  assert metrics["validation_frame_accuracy"] >= MIN_UNSEEN_ACCURACY, metrics
  assert metrics["test_frame_accuracy"] >= MIN_UNSEEN_ACCURACY, metrics
  assert metrics["train_frame_accuracy"] >= MIN_UNSEEN_ACCURACY, metrics
  # Only the first 200 train clips are trained on; the last 40 are held out.
  assert metrics["training_clips"] == 200 and metrics["steps"] == 100
  config, variables = encoders.load_directory(tmp_path / "enc")
  assert config == encoder_cfg and "head" not in variables["params"]
