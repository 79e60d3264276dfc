r"""Any projector of the catalog, with exactly the auxiliary losses it produces.

  python -m vsrllm_jax.train --config=configs/base.py:projector=perceiver --workdir=/tmp/vsr_p
  python -m vsrllm_jax.train --config=configs/base.py:projector=qformer,reconstruction=true ...
  python -m vsrllm_jax.train --config=configs/base.py:projector=hierarchical_moe,seed=1 ...

Which auxiliary losses a projector returns is read from the projector itself
(``projectors.loss_names``: an abstract evaluation), so every loss gets a weight
from AUX_LOSS_WEIGHTS and no weight is left without a loss. Override single
weights with ``--config.loss_weights.<name>=...``.
"""
from __future__ import annotations

from vsrllm_jax.configs import common

# Default weight of each auxiliary loss when its projector produces it.
AUX_LOSS_WEIGHTS = dict(contrastive=0.1, visual_text=0.1, reconstruction=0.1, routing=0.01)


def get_config(arg=None):
  args = common.parse_arg(arg, projector="conv_abstractor", seed=0, reconstruction=False)
  c = common.get_base_config()
  c.seed = args.seed
  c.projector = common.ConfigDict(dict(name=args.projector))
  if args.reconstruction:
    c.projector.reconstruction = True
  from vsrllm_jax.models import projectors  # pylint: disable=g-import-not-at-top
  c.loss_weights = common.ConfigDict(dict(
      lm=1.0, **{n: AUX_LOSS_WEIGHTS[n] for n in projectors.loss_names(c.projector)}))
  return c
