r"""The multiscale_contrastive preset: LM loss plus multi-scale InfoNCE.

  python -m vsrllm_jax.train --config=configs/contrastive.py --workdir=/tmp/vsr_run
  python -m vsrllm_jax.train --config=configs/contrastive.py:seed=1 --workdir=... \
      --config.loss_weights.contrastive=0.05
"""
from vsrllm_jax.configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, seed=0, num_output_tokens=32, contrastive_weight=0.1)
  c = common.get_base_config()
  c.seed = args.seed
  # Attention pooling learns slower than a per-frame MLP: 16 tokens or 2000
  # steps leave the middle slots unread (test WER 0.49 at 16 tokens / 2000 steps).
  c.total_steps = 4000
  c.projector = common.ConfigDict(dict(
      name="multiscale_contrastive",
      scales=(1, 2, 4),
      num_output_tokens=args.num_output_tokens,
      num_heads=4,
      mlp_ratio=2,
      temperature=0.1,
  ))
  c.loss_weights = common.ConfigDict(dict(lm=1.0, contrastive=args.contrastive_weight))
  return c
