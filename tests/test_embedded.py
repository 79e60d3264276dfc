"""The committed embedded default models: quality record, formats, transformers parity."""
import json
import os

import pytest

from vsrllm_jax.configs import common
from tests.test_encoder_pretraining import SMALL
from tests.test_llm_pretraining import check_transformers_parity
from tests.helpers.tiny import small_data_config
from vsrllm_jax.models import encoders

COMPACT = encoders.KINDS.get("compact")
from vsrllm_jax.formats import hf_llm
from vsrllm_jax.tools import make_embedded

EMBEDDED = common.EMBEDDED_DIR


def test_quality_record_meets_the_thresholds():
  with open(os.path.join(EMBEDDED, "quality.json")) as f:
    record = json.load(f)
  assert record["passed"]
  for key, want in make_embedded.THRESHOLDS.items():
    assert record["quality"][key] >= want, key


def test_embedded_llm_matches_transformers():
  check_transformers_parity(EMBEDDED + "/llm")


def test_embedded_encoder_loads_through_the_checkpoint_path():
  config, variables = encoders.load_directory(os.path.join(EMBEDDED, "encoder"))
  assert config == encoders.directory_config(os.path.join(EMBEDDED, "encoder"))
  assert set(variables) == {"params", "batch_stats"}


def test_default_config_names_the_embedded_models():
  c = common.get_base_config()
  assert c.encoder.path == os.path.join(EMBEDDED, "encoder")
  assert c.llm.path == c.llm.tokenizer_path == os.path.join(EMBEDDED, "llm")


def test_make_embedded_builds_atomically_and_keeps_old_models_on_a_miss(tmp_path):
  """The build command end to end at a tiny budget (quality at a reduced budget is
  asserted by test_encoder_pretraining and test_llm_pretraining)."""
  tiny = dict(data_config=small_data_config(tmp_path / "data", image_size=16, max_frames=32,
                                            train_clips=40, validation_clips=8, test_clips=8),
              encoder_config=SMALL, llm_shape=dict(hidden_dim=32, num_layers=1, num_heads=2,
                                                   num_kv_heads=1, head_dim=16, mlp_dim=64),
              encoder_options=dict(batch_size=4, crop_frames=16, heldout_train_clips=8),
              llm_options=dict(batch_size=8, max_len=40, eval_size=16))
  out = tmp_path / "embedded"
  record = make_embedded.build(str(out), encoder_steps=4, llm_steps=4,
                               thresholds={"encoder/test_frame_accuracy": 0.0}, **tiny)
  assert record["passed"] and sorted(p.name for p in out.iterdir()) == [
      "encoder", "llm", "quality.json"]
  assert json.loads((out / "quality.json").read_text()) == json.loads(json.dumps(record))
  assert set(make_embedded.THRESHOLDS) <= set(record["quality"])
  assert encoders.directory_config(out / "encoder") == SMALL
  assert hf_llm.from_pretrained(out / "llm")[0].config.hidden_dim == 32

  with pytest.raises(RuntimeError, match="miss their quality thresholds.*test_frame_accuracy"):
    make_embedded.build(str(out), encoder_steps=4, llm_steps=4,
                        thresholds={"encoder/test_frame_accuracy": 1.01}, **tiny)
  assert json.loads((out / "quality.json").read_text()) == json.loads(json.dumps(record))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "embedded"]  # no temporaries
