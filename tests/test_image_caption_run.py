"""Image captioning end to end: images + captions.jsonl, a CLIP tower from a Hugging
Face directory, cached tower features, the embedded LLM."""
import os

import numpy as np
import pytest
import transformers

from vsrllm_jax.configs import common
from tests.helpers.numerics import assert_close
from tests.helpers.image_fixtures import write_caption_folder
from vsrllm_jax.configs import image_caption
import jax

from vsrllm_jax import sharding
from vsrllm_jax.data import pipeline
from vsrllm_jax.data.batch import model_inputs
from vsrllm_jax.models.vsr_model import VSRModel
from vsrllm_jax.run import pretrained
from vsrllm_jax.run import setup as setup_lib
from vsrllm_jax.run import state as state_lib
from vsrllm_jax.run.data import RunData
from vsrllm_jax.training import step as step_lib



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
  setup = setup_lib.make(config)
  layout = state_lib.layout(setup.model, setup.config, setup.mesh)
  params, model_state = pretrained.load(setup.config, setup.mesh)
  state = state_lib.create(setup.model, setup.config, layout, pretrained_params=params,
                           pretrained_model_state=model_state)
  data = RunData(setup, state.params, state.model_state)
  cached = data.source("train")
  assert cached.feature_dim == 16 and np.all(cached.lengths == 16)
  batch = next(iter(data.train_loader()))
  assert batch["features"].shape == (8, 16, 16) and batch["features_mask"].all()
  step_lib.check_loss_weights(setup.model, layout, setup.config)
  step = step_lib.make_train_step(setup.model, setup.config, layout)
  state, metrics = step(state, sharding.global_batch(model_inputs(batch), setup.mesh))
  assert np.isfinite(float(metrics["train/loss"]))
  # The cache holds what the tower computes on the raw images (eval preprocessing).
  raw = next(pipeline.eval_batches(config.data, setup.tokenizer, "train", global_batch_size=8,
                                   source=pipeline.data_source(config.data, "train")))
  assert raw["video"].shape == (8, 1, 32, 32, 3)
  # The step donated the first state; the frozen tower's params are unchanged in the new one.
  feats, mask = jax.jit(lambda p, s, b: setup.model.apply({"params": p, **s}, b,
                                                          method=VSRModel.encode))(
      state.params, state.model_state, {"video": raw["video"], "video_mask": raw["video_mask"]})
  assert mask.shape == (8, 16) and bool(mask.all())
  assert_close(feats[0], cached[0]["features"], rtol=1e-5, atol_frac=1e-6)
