r"""Builds the embedded default models: a pretrained encoder and a pretrained LLM.

  python -m vsrllm_jax.tools.make_embedded                 # -> vsrllm_jax/embedded/
  python -m vsrllm_jax.tools.make_embedded --out_dir=/tmp/emb --encoder_steps=150 --llm_steps=200

- ``encoder/``: the AV-HuBERT-shape video encoder of ``configs/common.py``,
  pretrained by per-frame viseme classification on the synthetic data's
  TRAINING speakers only (validation and test speakers stay unseen), saved as
  ``config.json`` + ``model.safetensors``.
- ``llm/``: a small Llama-architecture LLM pretrained on text of the
  synthetic grammar and the instruction templates, in the task's shape
  (``BOS instruction noisy-span sentence EOS``), saved as a Hugging Face
  checkpoint directory with its tokenizer.
- ``quality.json``: the measured quality and the thresholds it must meet.

The result is written to a temporary directory and renamed into place, and
the command fails (leaving the old models) if a threshold is missed.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

from absl import app, flags

from vsrllm_jax.configs import common
from vsrllm_jax.data.synthetic import synthetic_lips
from vsrllm_jax.data.synthetic.spec import spec_from_config
from vsrllm_jax.models.encoders.video_encoder import VideoEncoderConfig
from vsrllm_jax.tools import pretrain_encoder, pretrain_llm

EMBEDDED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "embedded")

# What the full build must reach (measured values are in quality.json).
# The encoder's accuracy is per frame, on speakers it never saw.
THRESHOLDS = {
    "encoder/validation_frame_accuracy": 0.80,
    "encoder/test_frame_accuracy": 0.80,
    # Next-token accuracy on held-out sentences after a noisy span; copying the
    # span's words scores about 0.92 (dropped words cannot be recovered).
    "llm/noisy_span/token_accuracy": 0.88,
}
DEFAULT_ENCODER_STEPS = 1200
DEFAULT_LLM_STEPS = 400



def define_flags(flag_values=flags.FLAGS) -> None:
  """The tool's flags, defined only when run as a program (see train.define_flags)."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string("out_dir", EMBEDDED_DIR, "Where encoder/, llm/ and quality.json are "
                      "written (replaced only when the build succeeds); default: the "
                      "package's vsrllm_jax/embedded/.", **fv)
  flags.DEFINE_integer("encoder_steps", DEFAULT_ENCODER_STEPS,
                       "Training steps of the encoder pretraining (tools.pretrain_encoder).", **fv)
  flags.DEFINE_integer("llm_steps", DEFAULT_LLM_STEPS,
                       "Training steps of the LLM pretraining (tools.pretrain_llm).", **fv)
  flags.DEFINE_integer("seed", 0, "Seed of both pretrainings.", **fv)
  flags.DEFINE_string("data_dir", "", "Synthetic data directory ('' -> the default; built "
                      "there when missing).", **fv)
  flags.DEFINE_bool("check_thresholds", True, "Fail, keeping the old models, if a quality "
                    "threshold (THRESHOLDS) is missed.", **fv)


def build(out_dir: str, *, encoder_steps: int, llm_steps: int, seed: int = 0, data_dir: str = "",
          thresholds: dict[str, float] | None = THRESHOLDS, data_config=None,
          encoder_config: VideoEncoderConfig | None = None, llm_shape: dict | None = None,
          encoder_options: dict | None = None, llm_options: dict | None = None) -> dict:
  """Builds both models into ``out_dir`` (atomically); returns the quality record.

  The keyword arguments after ``thresholds`` shrink the build for tests: the
  data section (default: the base config's), the encoder's shape (default:
  the base config's), the LLM's shape, and extra arguments of the two
  pretraining functions.
  """
  config = common.get_base_config()
  data = (config.data if data_config is None else data_config).copy_and_resolve_references()
  with data.unlocked():
    data.data_dir = data_dir or data.data_dir or synthetic_lips.default_data_dir()
  encoder_config = encoder_config or VideoEncoderConfig.from_config_dict(config.encoder)
  synthetic_lips.prepare(spec_from_config(data), data.data_dir)
  out_dir = os.path.abspath(out_dir)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp_embedded_", dir=parent)
  try:
    t0 = time.time()
    enc = pretrain_encoder.pretrain_encoder(
        data, encoder_config, steps=encoder_steps, seed=seed, out_dir=os.path.join(tmp, "encoder"),
        **dict(dict(batch_size=8, learning_rate=3e-3), **(encoder_options or {})))
    lm = pretrain_llm.pretrain_llm(out_dir=os.path.join(tmp, "llm"), steps=llm_steps, seed=seed,
                                   llm_shape=llm_shape, **(llm_options or {}))
    quality = {f"encoder/{k}": v for k, v in enc.items() if isinstance(v, (int, float))}
    quality.update({f"llm/{k}": v for k, v in lm.items() if isinstance(v, (int, float))})
    record = dict(quality=quality, thresholds=thresholds or {}, seconds=round(time.time() - t0, 1),
                  command=f"python -m vsrllm_jax.tools.make_embedded --encoder_steps="
                          f"{encoder_steps} --llm_steps={llm_steps} --seed={seed}")
    missed = {k: (quality.get(k), v) for k, v in (thresholds or {}).items()
              if not quality.get(k, float("-inf")) >= v}
    record["passed"] = not missed
    with open(os.path.join(tmp, "quality.json"), "w") as f:
      json.dump(record, f, indent=2)
      f.write("\n")
    if missed:
      raise RuntimeError(f"embedded models miss their quality thresholds (got, want): {missed}")
    if os.path.exists(out_dir):
      old = out_dir + ".old"
      shutil.rmtree(old, ignore_errors=True)
      os.rename(out_dir, old)
      os.rename(tmp, out_dir)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, out_dir)
    return record
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  record = build(f.out_dir, encoder_steps=f.encoder_steps, llm_steps=f.llm_steps, seed=f.seed,
                 data_dir=f.data_dir, thresholds=THRESHOLDS if f.check_thresholds else None)
  print(json.dumps(record, indent=2))


if __name__ == "__main__":
  define_flags()
  app.run(main)
