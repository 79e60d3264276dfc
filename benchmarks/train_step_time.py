r"""Times the jitted train step of a config on synthetic batches (no data set needed).

  python benchmarks/train_step_time.py --config=configs/conv_abstractor.py --steps=10

Prints JSON: compile time, and the median / min step time over --steps steps
after --warmup steps. Uses random batches of the config's shapes, so it
measures the model and optimizer, not the input pipeline. Like training, a
config with ``data.cache_features`` gets encoder features instead of video
(the frozen encoder then runs once per clip, not per step).
"""
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

import jax  # noqa: E402

import machine_rates  # noqa: E402  (benchmarks/)
from vsrllm_jax.configs import packaged  # noqa: E402
from vsrllm_jax.data import batch as batch_lib  # noqa: E402
from vsrllm_jax.models import build as build_lib  # noqa: E402
from vsrllm_jax.models import encoders  # noqa: E402

_CONFIG = packaged.define_config_flag("config", "configs/conv_abstractor.py", "Config file.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_VOCAB = flags.DEFINE_integer("vocab_size", 64, "LLM vocabulary when the config leaves it to "
                              "the tokenizer.")


def main(argv):
  del argv
  config = _CONFIG.value
  with config.unlocked():
    if not config.llm.path and config.llm.vocab_size <= 0:
      config.llm.vocab_size = _VOCAB.value
  model = build_lib.build_model(config)          # a module description: no weights yet
  with config.unlocked():
    config.llm.vocab_size = model.llm_config.vocab_size
  batch = batch_lib.random_batch(config, config.batch_size)
  if config.data.cache_features:
    batch = batch_lib.with_features(batch, encoders.feature_dim(model.encoder_config), seed=0)
  compile_s, times = machine_rates.time_train_step(config, batch, warmup=_WARMUP.value,
                                                   steps=_STEPS.value)
  print(json.dumps({"config": config.projector.name, "batch_size": config.batch_size,
                    "inputs": "features" if config.data.cache_features else "video",
                    "devices": len(jax.devices()), "compile_s": round(compile_s, 2),
                    "median_step_ms": round(statistics.median(times) * 1e3, 2),
                    "min_step_ms": round(min(times) * 1e3, 2)}))


if __name__ == "__main__":
  app.run(main)
