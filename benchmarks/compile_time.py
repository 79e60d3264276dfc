r"""Train-step compile time against LLM depth (layers under nn.scan: should stay flat).

  python benchmarks/compile_time.py --config=configs/conv_abstractor.py

Builds the config's model with a random LLM of --shallow and --deep layers
(the config's widths otherwise; random encoder too), and times lower + compile
of the jitted train step (training.step.make_train_step, as in
train_step_time.py) on a cached-features batch, --repeats fresh compiles each
(``jax.clear_caches()`` in between). Prints JSON lines per depth and the ratio
deep / shallow of the medians (goal <= 1.5).
"""
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

import jax  # noqa: E402

from vsrllm_jax import sharding  # noqa: E402
from vsrllm_jax.configs import packaged  # noqa: E402
from vsrllm_jax.data.batch import random_batch, with_features  # noqa: E402
from vsrllm_jax.models import build as build_lib  # noqa: E402
from vsrllm_jax.models import encoders  # noqa: E402
from vsrllm_jax.run import state as state_lib  # noqa: E402
from vsrllm_jax.training import step as step_lib  # noqa: E402

_CONFIG = packaged.define_config_flag("config", "configs/conv_abstractor.py", "Config file.")
_SHALLOW = flags.DEFINE_integer("shallow", 4, "LLM layers of the shallow model.")
_DEEP = flags.DEFINE_integer("deep", 32, "LLM layers of the deep model.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Fresh compiles per depth.")
_VOCAB = flags.DEFINE_integer("vocab_size", 64, "LLM vocabulary (random init).")


def _setup(config, layers: int):
  """(make_step, state, batch) for the config with a random LLM of ``layers`` layers."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.llm.path = ""
    config.encoder.path = ""
    config.llm.vocab_size = _VOCAB.value
    config.llm.num_layers = layers
  mesh = sharding.make_mesh(config.mesh.shape)
  model = build_lib.build_model(config)
  layout = state_lib.layout(model, config, mesh)
  state = state_lib.create(model, config, layout)
  batch = with_features(random_batch(config, config.batch_size),
                        encoders.feature_dim(model.encoder_config), seed=1)
  batch = sharding.global_batch(batch, mesh)
  make = lambda: step_lib.make_train_step(model, config, layout)
  return make, state, batch


def main(argv):
  del argv
  config = _CONFIG.value
  depths = (_SHALLOW.value, _DEEP.value)
  setups = {n: _setup(config, n) for n in depths}
  lower_s = {n: [] for n in depths}
  compile_s = {n: [] for n in depths}
  for _ in range(_REPEATS.value):
    for n in depths:  # interleaved, so that drift on a shared machine hits both alike
      make, state, batch = setups[n]
      jax.clear_caches()
      step = make()
      t = time.perf_counter()
      lowered = step.lower(state, batch)
      t1 = time.perf_counter()
      lowered.compile()
      compile_s[n].append(time.perf_counter() - t1)
      lower_s[n].append(t1 - t)
  medians = {}
  for n in depths:
    total = [a + b for a, b in zip(lower_s[n], compile_s[n])]
    medians[n] = statistics.median(total)
    print(json.dumps({"llm_layers": n, "median_lower_compile_s": round(medians[n], 3),
                      "median_lower_s": round(statistics.median(lower_s[n]), 3),
                      "median_compile_s": round(statistics.median(compile_s[n]), 3),
                      "runs_s": [round(x, 3) for x in total], "config": config.projector.name,
                      "devices": len(jax.devices()), "llm_hidden": config.llm.hidden_dim,
                      "batch_size": config.batch_size}))
  print(json.dumps({"deep_over_shallow": round(medians[depths[1]] / medians[depths[0]], 3)}))


if __name__ == "__main__":
  app.run(main)
