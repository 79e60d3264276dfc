r"""text_multiscale_contrastive preset: the instruction conditions the projector;
LM loss, multi-scale InfoNCE and visual-text InfoNCE (label text in the loss only).

  python -m vsrllm_jax.train --config=configs/text_aware.py --workdir=/tmp/vsr_text
  python -m vsrllm_jax.train --config=configs/text_aware.py:visual_text_weight=0.05 --workdir=...
"""
from vsrllm_jax.configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, seed=0, num_output_tokens=32, contrastive_weight=0.1,
                          visual_text_weight=0.1)
  c = common.get_base_config()
  c.seed = args.seed
  c.total_steps = 4000          # attention pooling learns slower (see configs/contrastive.py)
  c.projector = common.ConfigDict(dict(name="text_multiscale_contrastive",
                                       num_output_tokens=args.num_output_tokens))
  c.loss_weights = common.ConfigDict(dict(lm=1.0, contrastive=args.contrastive_weight,
                                          visual_text=args.visual_text_weight))
  return c
