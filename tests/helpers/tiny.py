"""Tiny configs and batches shared by the tests (shapes small enough for CPU)."""
import numpy as np

from vsrllm_jax.configs import common


def tiny_config(projector: str = "mlp", **projector_fields):
  c = common.get_base_config()
  c.data.image_size = 16
  c.data.max_frames = 12
  c.data.max_instruction_tokens = 6
  c.data.max_label_tokens = 5
  c.encoder.stem_channels = 4
  c.encoder.resnet_channels = (4, 8, 8, 8)
  c.encoder.hidden_dim = 16
  c.encoder.num_heads = 2
  c.encoder.mlp_dim = 32
  c.encoder.num_layers = 1
  c.encoder.path = ""            # random init of the tiny shapes below
  c.llm.path = ""
  c.llm.tokenizer_path = ""
  c.llm.hidden_dim = 32
  c.llm.num_heads = 4
  c.llm.num_kv_heads = 2
  c.llm.head_dim = 8
  c.llm.mlp_dim = 64
  c.llm.vocab_size = 40
  c.batch_size = 8
  c.optim.schedules.main.warmup_steps = 1
  c.optim.schedules.main.peak_lr = 1e-2
  c.projector = common.ConfigDict(dict(name=projector, **projector_fields))
  if projector == "multiscale_contrastive":
    c.projector.num_output_tokens = 4
    c.loss_weights = common.ConfigDict(dict(lm=1.0, contrastive=0.1))
  return c


def random_batch(config, batch_size: int, seed: int = 0) -> dict:
  """Random numpy batch with some padding in every segment."""
  rng = np.random.default_rng(seed)
  d = config.data
  v = config.llm.vocab_size
  t, li, ll = d.max_frames, d.max_instruction_tokens, d.max_label_tokens
  video_len = rng.integers(t // 2, t + 1, batch_size)
  instr_len = rng.integers(2, li + 1, batch_size)
  label_len = rng.integers(2, ll + 1, batch_size)
  return dict(
      video=rng.integers(0, 255, (batch_size, t, d.image_size, d.image_size, 1)).astype(np.uint8),
      video_mask=np.arange(t)[None] < video_len[:, None],
      instruction_ids=rng.integers(4, v, (batch_size, li)).astype(np.int32),
      instruction_mask=np.arange(li)[None] < instr_len[:, None],
      label_ids=rng.integers(4, v, (batch_size, ll)).astype(np.int32),
      label_mask=np.arange(ll)[None] < label_len[:, None],
  )


def small_data_config(data_dir, **sizes):
  """The default data config with small sizes for tests, written under ``data_dir``."""
  cfg = common.get_base_config().data
  cfg.update(dict(sizes, data_dir=str(data_dir)))
  return cfg
