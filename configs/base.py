r"""Any projector of the catalog, with exactly the auxiliary losses it produces.

  python -m vsrllm_jax.train --config=configs/base.py:projector=perceiver --workdir=/tmp/vsr_p
  python -m vsrllm_jax.train --config=configs/base.py:projector=qformer,reconstruction=true ...
  python -m vsrllm_jax.train --config=configs/base.py:projector=hierarchical_moe,seed=1 ...

Which auxiliary losses a projector returns is read from the projector itself
(an abstract evaluation, nothing is computed), so every loss gets a weight
from AUX_LOSS_WEIGHTS and no weight is left without a loss. Override single
weights with ``--config.loss_weights.<name>=...``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from configs import common

# Default weight of each auxiliary loss when its projector produces it.
AUX_LOSS_WEIGHTS = dict(contrastive=0.1, visual_text=0.1, reconstruction=0.1, routing=0.01)


def produced_aux_losses(projector_config) -> list[str]:
  """Names of the auxiliary losses the configured projector adds to ``lm``."""
  from vsrllm_jax.models import projectors  # pylint: disable=g-import-not-at-top
  from vsrllm_jax.models.projectors import text_aware  # pylint: disable=g-import-not-at-top
  fields = {k: v for k, v in projector_config.items() if k != "name"}
  module = projectors.build(projector_config.name, dict(fields, output_dim=16))
  features, mask = jnp.zeros((2, 8, 8)), jnp.ones((2, 8), bool)
  kwargs = {}
  if module.text_aware:
    kwargs = dict(text=jnp.zeros((2, 3, 16)), text_mask=jnp.ones((2, 3), bool))

  def run():
    variables = module.init(jax.random.key(0), features, mask, **kwargs)
    return module.apply(variables, features, mask, **kwargs).aux_losses

  names = set(jax.eval_shape(run))
  if text_aware.visual_text_temperature(projector_config) is not None:
    names.add("visual_text")
  return sorted(names)


def get_config(arg=None):
  args = common.parse_arg(arg, projector="conv_abstractor", seed=0, reconstruction=False)
  c = common.get_base_config()
  c.seed = args.seed
  c.projector = common.ConfigDict(dict(name=args.projector))
  if args.reconstruction:
    c.projector.reconstruction = True
  c.loss_weights = common.ConfigDict(dict(
      lm=1.0, **{n: AUX_LOSS_WEIGHTS[n] for n in produced_aux_losses(c.projector)}))
  return c
