"""Opening a trained run: what decode, transcribe, convert and compare need, nothing more.

One function, ``open_run``, for every command that reads a trained run. It
reads the run's config.json, builds the model, and restores only the weights
(params and model state) of the best checkpoint by validation WER, or of
``step``, straight into their shardings: no optimizer state, no data-iterator
state, no pretrained weights read from their sources, no feature cache of a
split nobody decodes. Workdirs written before this module existed open the same
way (their checkpoints hold the same items).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections

from vsrllm_jax.inference import evaluation, predictor
from vsrllm_jax.run import checkpoint, workdir as workdir_lib
from vsrllm_jax.run import setup as setup_lib
from vsrllm_jax.run import state as state_lib
from vsrllm_jax.run.data import RunData
from vsrllm_jax.run.setup import RunSetup


@dataclasses.dataclass
class TrainedRun:
  """A trained run's setup and weights at one checkpoint."""
  workdir: str
  step: int
  setup: RunSetup
  params: Any
  model_state: Any
  labels: dict                 # param path -> schedule name, or optim.FROZEN

  @property
  def config(self) -> ml_collections.ConfigDict:
    return self.setup.config

  @property
  def model(self):
    return self.setup.model

  def data(self) -> RunData:
    """The run's data, its features (when cached) computed with these weights."""
    return RunData(self.setup, self.params, self.model_state)

  def predictor(self):
    s = self.setup
    return predictor.make_predictor(s.model, s.config, eos_id=s.eos_ids,
                                    pad_id=s.tokenizer.pad_token_id, mesh=s.mesh)

  def decode(self, batches) -> list[dict]:
    """{id, reference, hypothesis(, task)} per real clip of ``batches``."""
    s = self.setup
    return evaluation.decode_split(self.predictor(), self.params, self.model_state, batches,
                                   s.mesh, s.tokenizer, eos_id=s.eos_ids)

  def host_weights(self) -> tuple[Any, Any]:
    """(params, model_state) as host numpy trees (for writing them elsewhere)."""
    return jax.device_get(self.params), jax.device_get(self.model_state)


def open_run(workdir: str, *, step: int | None = None, config=None, on_host: bool = False
             ) -> TrainedRun:
  """Opens ``workdir`` at its best checkpoint (or ``step`` from checkpoints/).

  ``config`` replaces the run's config.json (e.g. other decode settings, or
  data options for transcription). ``on_host``: one device, whatever mesh the
  run trained on (export and import read the weights on the host).
  """
  config = workdir_lib.load_config(workdir, config)
  setup = setup_lib.host_setup(config) if on_host else setup_lib.make(config)
  layout = state_lib.layout(setup.model, setup.config, setup.mesh)
  ckpts = checkpoint.Checkpoints(workdir, setup.config.keep_checkpoints)
  try:
    step, best = ckpts.select(step)
    weights, _ = ckpts.restore_weights(step, layout.weights(), best=best)
  finally:
    ckpts.close()
  return TrainedRun(workdir=workdir, step=step, setup=setup, params=weights["params"],
                    model_state=weights["model_state"], labels=layout.labels)
