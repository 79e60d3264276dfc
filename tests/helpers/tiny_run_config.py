r"""A tiny end-to-end config for subprocess tests of the train command.

  python -m vsrllm_jax.train --config=tests/helpers/tiny_run_config.py --workdir=/tmp/x
"""
from vsrllm_jax.configs import common
from tests.helpers.tiny import tiny_config


def get_config(arg=None):
  args = common.parse_arg(arg, projector="mlp", steps=12)
  c = tiny_config(args.projector)
  c.total_steps = args.steps
  c.batch_size = 4
  c.eval_batch_size = 4
  c.log_every = 1
  c.eval_every = 6
  c.checkpoint_every = 2
  c.keep_checkpoints = 3
  c.max_eval_batches = 1
  c.llm.vocab_size = 0                 # from the tokenizer
  c.data.max_frames = 24
  c.data.train_clips = 32
  c.data.validation_clips = 4
  c.data.test_clips = 4
  c.data.max_instruction_tokens = 12
  c.data.max_label_tokens = 8
  c.decode.max_new_tokens = 8
  return c
