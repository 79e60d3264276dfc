"""Image captioning end to end: images + captions.jsonl, a CLIP tower from a Hugging
Face directory, cached tower features, the embedded LLM."""
import os

import numpy as np
import pytest
import transformers

from configs import common
from tests.helpers.numerics import assert_close
from tests.image_fixtures import write_caption_folder
from configs import image_caption
from vsrllm_jax import experiment, train_step
from vsrllm_jax.data import pipeline



@pytest.fixture(scope="module")
def config(tmp_path_factory):
  root = tmp_path_factory.mktemp("captions")
  write_caption_folder(root, size=(40, 48))
  tower = str(root / "clip")
  transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
      hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
      image_size=32, patch_size=8)).save_pretrained(tower)
  llm = os.path.join(common.EMBEDDED_DIR, "llm")
  c = image_caption.get_config(f"manifest_dir={root},tower={tower},llm={llm},steps=2")
  c.data.data_dir = str(root / "tfds")
  c.data.max_label_tokens = 12
  c.data.max_instruction_tokens = 16
  c.batch_size = c.eval_batch_size = 8
  return c


def test_config_takes_the_towers_shapes(config):
  assert config.data.image_size == 32 and config.data.resize_mode == "center_crop"
  assert config.data.max_frames == 16          # (32 / 8)^2 patches, class token dropped


def test_cached_tower_features_train_and_match_the_tower(config):
  exp = experiment.Experiment(config)
  cached = exp.source("train")
  assert cached.feature_dim == 16 and np.all(cached.lengths == 16)
  batch = next(iter(exp.train_loader()))
  assert batch["features"].shape == (8, 16, 16) and batch["features_mask"].all()
  step = exp.train_step_fn()
  from vsrllm_jax import sharding  # pylint: disable=g-import-not-at-top
  state, metrics = step(exp.state, sharding.global_batch(train_step.model_inputs(batch), exp.mesh))
  assert np.isfinite(float(metrics["train/loss"]))
  # The cache holds what the tower computes on the raw images (eval preprocessing).
  raw = next(pipeline.eval_batches(config.data, exp.tokenizer, "train", global_batch_size=8,
                                   source=pipeline.data_source(config.data, "train")))
  assert raw["video"].shape == (8, 1, 32, 32, 3)
  encode = exp._encode_fn()  # pylint: disable=protected-access
  # The step donated exp.state; the frozen tower's params are unchanged in the new state.
  feats, mask = encode(state.params, state.model_state,
                       {"video": raw["video"], "video_mask": raw["video_mask"]})
  assert mask.shape == (8, 16) and bool(mask.all())
  assert_close(feats[0], cached[0]["features"], rtol=1e-5, atol_frac=1e-6)
