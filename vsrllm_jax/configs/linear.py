r"""Linear projector (one Dense per frame), LM loss only.

  python -m vsrllm_jax.train --config=configs/linear.py --workdir=/tmp/vsr_linear
"""
from vsrllm_jax.configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, seed=0)
  c = common.get_base_config()
  c.seed = args.seed
  c.projector = common.ConfigDict(dict(name="linear"))
  return c
