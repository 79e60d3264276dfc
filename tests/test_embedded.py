"""The committed embedded default models: quality record, formats, transformers parity."""
import json
import os

from configs import common
from tests.test_llm_pretraining import check_transformers_parity
from vsrllm_jax.models import encoder_io
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
  config, variables = encoder_io.load_encoder(os.path.join(EMBEDDED, "encoder"))
  assert config == encoder_io.read_config(os.path.join(EMBEDDED, "encoder"))
  assert set(variables) == {"params", "batch_stats"}


def test_default_config_names_the_embedded_models():
  c = common.get_base_config()
  assert c.encoder.path == os.path.join(EMBEDDED, "encoder")
  assert c.llm.path == c.llm.tokenizer_path == os.path.join(EMBEDDED, "llm")
