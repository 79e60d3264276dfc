r"""MLP projector (LLaVA-1.5 style), LM loss only.

  python -m vsrllm_jax.train --config=configs/mlp.py --workdir=/tmp/vsr_mlp
  python -m vsrllm_jax.train --config=configs/mlp.py:depth=3,seed=1 --workdir=...
"""
from vsrllm_jax.configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, seed=0, depth=2, hidden_dim=0)
  c = common.get_base_config()
  c.seed = args.seed
  c.projector = common.ConfigDict(dict(name="mlp", depth=args.depth,
                                       hidden_dim=args.hidden_dim or None))
  return c
