r"""qformer preset (BLIP-2-style learned queries), LM loss plus feature reconstruction.

  python -m vsrllm_jax.train --config=configs/qformer.py --workdir=/tmp/vsr_qformer
  python -m vsrllm_jax.train --config=configs/qformer.py:num_queries=16,seed=1 --workdir=...
"""
from vsrllm_jax.configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, seed=0, num_queries=32, num_layers=2,
                          reconstruction_weight=0.1)
  c = common.get_base_config()
  c.seed = args.seed
  c.projector = common.ConfigDict(dict(name="qformer", num_queries=args.num_queries,
                                       num_layers=args.num_layers,
                                       reconstruction=args.reconstruction_weight > 0))
  c.loss_weights = common.ConfigDict(dict(lm=1.0))
  if args.reconstruction_weight > 0:
    c.loss_weights.reconstruction = args.reconstruction_weight
  return c
