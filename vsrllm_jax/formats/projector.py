"""The projector's export format: its subtree of the composed model in torch layout
(``torch_layout``), what ``projector.safetensors`` of an export holds."""
from __future__ import annotations

import jax
import flax.linen as nn
import numpy as np

from vsrllm_jax.data.batch import dummy_batch
from vsrllm_jax.formats import torch_layout
from vsrllm_jax.models.vsr_model import VSRModel


def layout(model: VSRModel, config) -> torch_layout.TorchLayout:
  """The projector's layout, its modules found by running ``project`` abstractly on a
  batch of the config's shapes."""
  batch = {k: np.asarray(v) for k, v in dummy_batch(config, 1).items()}
  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(0)}
  boxed = jax.eval_shape(lambda: model.init(rngs, batch, train=False))
  return torch_layout.plan(model, boxed["params"], variables=nn.meta.unbox(boxed),
                           args=(batch,), method=VSRModel.project, kwargs=dict(train=False),
                           prefix=("projector",))


def to_state_dict(model: VSRModel, config, params) -> dict[str, np.ndarray]:
  return torch_layout.to_state_dict(params, layout(model, config))


def from_state_dict(model: VSRModel, config, state) -> dict:
  """{'projector': tree} of numpy arrays."""
  return torch_layout.from_state_dict(state, layout(model, config))
