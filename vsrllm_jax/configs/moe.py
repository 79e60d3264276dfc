r"""hierarchical_moe preset: routed expert FFNs, LM loss plus the routing loss.

  python -m vsrllm_jax.train --config=configs/moe.py --workdir=/tmp/vsr_moe
  python -m vsrllm_jax.train --config=configs/moe.py:num_experts=8,top_k=1,seed=1 --workdir=...
"""
from vsrllm_jax.configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, seed=0, num_experts=4, top_k=2, routing_weight=0.01)
  c = common.get_base_config()
  c.seed = args.seed
  c.projector = common.ConfigDict(dict(name="hierarchical_moe", num_experts=args.num_experts,
                                       top_k=args.top_k))
  c.loss_weights = common.ConfigDict(dict(lm=1.0, routing=args.routing_weight))
  return c
