r"""Convolutional abstractor (Honeybee's C-Abstractor in time), LM loss only.

  python -m vsrllm_jax.train --config=configs/conv_abstractor.py --workdir=/tmp/vsr_conv
  python -m vsrllm_jax.train --config=configs/conv_abstractor.py:stride=1,seed=1 --workdir=...
"""
from vsrllm_jax.configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, seed=0, depth=2, kernel_size=5, stride=2, hidden_dim=0)
  c = common.get_base_config()
  c.seed = args.seed
  c.projector = common.ConfigDict(dict(name="conv_abstractor", depth=args.depth,
                                       kernel_size=args.kernel_size, stride=args.stride,
                                       hidden_dim=args.hidden_dim or None))
  return c
