r"""Decodes a split with a trained run and scores it.

  python -m vsrllm_jax.decode --workdir=/tmp/vsr_run [--split=test] [--step=N] [--config=...]
      [--strategy=greedy|sample|beam] [--beam_size=K] [--length_penalty=A]
      [--temperature=T] [--top_p=P]

Opens the run (``run.open``: its config.json, or ``--config`` in its place, and
the weights of the best checkpoint by validation WER or of ``--step``), decodes with
``config.decode`` (greedy by default), writes ``WORKDIR/decode/<split>.jsonl``
lines ``{"id", "reference", "hypothesis"}`` and prints WER (ours and
VSP-LLM's, ``wer_plain``), CER and the data set's own metrics.

The decoding flags, when given, override the matching ``config.decode`` keys
(any other key: ``--config.decode.<key>=...`` with ``--config``):
``--strategy`` greedy, sample (temperature / top-p, seed ``decode.seed``) or
beam; ``--beam_size`` hypotheses kept per clip; ``--length_penalty`` beam
score = sum logprob / generated_length ** length_penalty (transformers'
convention); ``--temperature`` sampling temperature (0 = greedy);
``--top_p`` nucleus mass in (0, 1].
"""
from __future__ import annotations

import json
import logging

import ml_collections
from absl import app, flags

from vsrllm_jax.configs import packaged
from vsrllm_jax.inference import evaluation, generation, scoring
from vsrllm_jax.run import open as open_lib
from vsrllm_jax.run import workdir as workdir_lib


def define_flags(flag_values=flags.FLAGS) -> None:
  """The command's flags, defined only when run as a program (see train.define_flags)."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string("workdir", None, "A training run's workdir.", required=True, **fv)
  flags.DEFINE_enum("split", "test", ["train", "validation", "test"], "Split to decode.", **fv)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the best).", **fv)
  packaged.define_config_flag("config", None, "Overrides the run's config.json.", **fv)
  flags.DEFINE_enum("strategy", None, list(generation.STRATEGIES), "Overrides decode.strategy.",
                    **fv)
  flags.DEFINE_integer("beam_size", None, "Overrides decode.beam_size.", **fv)
  flags.DEFINE_float("length_penalty", None, "Overrides decode.length_penalty.", **fv)
  flags.DEFINE_float("temperature", None, "Overrides decode.temperature.", **fv)
  flags.DEFINE_float("top_p", None, "Overrides decode.top_p.", **fv)


def with_decode_options(config, **options):
  """A copy of ``config`` whose decode keys are replaced by the options that are not None.

  Validates the resulting decode section (errors name the key).
  """
  config = ml_collections.ConfigDict(config.to_dict())
  with config.unlocked():
    for key, value in options.items():
      if value is not None:
        if key in config.decode:
          del config.decode[key]  # the flag's type wins (e.g. a float over an int)
        config.decode[key] = value
  generation.options_from_config(config.decode)
  return config


def decode(workdir: str, split: str = "test", step: int | None = None, config=None,
           **decode_options) -> dict:
  """Returns the split's rates (``summarize_rows``), its data set's own metrics
  (``scoring.dataset_metrics``: ``slot_accuracy/{slot}`` on GRID), 'step' and 'path'.

  ``decode_options`` (e.g. strategy='beam', beam_size=8) override config.decode.
  """
  config = with_decode_options(workdir_lib.load_config(workdir, config), **decode_options)
  run = open_lib.open_run(workdir, step=step, config=config)
  rows = run.decode(run.data().eval_batches(split))
  path = evaluation.write_decodes(workdir, split, rows)
  return dict(scoring.summarize_rows(rows), **scoring.dataset_metrics(config, rows),
              step=run.step, path=path)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  result = decode(f.workdir, f.split, f.step, f.config, strategy=f.strategy,
                  beam_size=f.beam_size, length_penalty=f.length_penalty,
                  temperature=f.temperature, top_p=f.top_p)
  logging.info("wrote %s", result["path"])
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  define_flags()
  app.run(main)
