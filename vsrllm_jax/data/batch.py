"""The fields of a batch that the model reads, and batches of a config's shapes.

``pipeline`` documents every field; ids, texts and tasks stay on the host.
``dummy_batch`` (zeros) shapes initialisation and shape checks; ``random_batch``
(random values with padding in every segment) feeds tests and benchmarks that
need no data set.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from vsrllm_jax import data as data_lib

MODEL_KEYS = ("video", "video_mask", "features", "features_mask", "instruction_ids",
              "instruction_mask", "label_ids", "label_mask", "cluster_counts", "example_mask",
              "ctc_labels", "ctc_label_mask")


def model_inputs(batch: dict) -> dict:
  """The numeric fields the model reads (ids and texts stay on the host)."""
  return {k: v for k, v in batch.items() if k in MODEL_KEYS}


def dummy_batch(config, batch_size: int = 1) -> dict:
  """Zeros with the shapes of one batch of raw video (with CTC targets when
  ``data.ctc_max_chars`` asks for them, as the pipeline delivers them)."""
  d = config.data
  batch = dict(
      video=jnp.zeros((batch_size, d.max_frames, d.image_size, d.image_size,
                       data_lib.frame_channels(d)), jnp.uint8),
      video_mask=jnp.ones((batch_size, d.max_frames), bool),
      instruction_ids=jnp.zeros((batch_size, d.max_instruction_tokens), jnp.int32),
      instruction_mask=jnp.ones((batch_size, d.max_instruction_tokens), bool),
      label_ids=jnp.zeros((batch_size, d.max_label_tokens), jnp.int32),
      label_mask=jnp.ones((batch_size, d.max_label_tokens), bool),
  )
  chars = int(d.get("ctc_max_chars", 0))
  if chars > 0:
    batch.update(ctc_labels=jnp.zeros((batch_size, chars), jnp.int32),
                 ctc_label_mask=jnp.ones((batch_size, chars), bool))
  return batch


def random_batch(config, batch_size: int, seed: int = 0, vocab_size: int | None = None) -> dict:
  """A random numpy batch of raw video with some padding in every segment."""
  rng = np.random.default_rng(seed)
  d = config.data
  v = vocab_size or config.llm.vocab_size
  t, li, ll = d.max_frames, d.max_instruction_tokens, d.max_label_tokens
  video_len = rng.integers(t // 2, t + 1, batch_size)
  instr_len = rng.integers(2, li + 1, batch_size)
  label_len = rng.integers(2, ll + 1, batch_size)
  return dict(
      video=rng.integers(0, 255, (batch_size, t, d.image_size, d.image_size,
                                  data_lib.frame_channels(d))).astype(np.uint8),
      video_mask=np.arange(t)[None] < video_len[:, None],
      instruction_ids=rng.integers(4, v, (batch_size, li)).astype(np.int32),
      instruction_mask=np.arange(li)[None] < instr_len[:, None],
      label_ids=rng.integers(4, v, (batch_size, ll)).astype(np.int32),
      label_mask=np.arange(ll)[None] < label_len[:, None],
  )


def with_features(batch: dict, feature_dim: int, seed: int | None = None) -> dict:
  """``batch`` as a feature-cache source delivers it: encoder features [B, T, D] (zeros,
  or standard normal draws with ``seed``) and their mask in place of the video."""
  batch = dict(batch)
  mask = np.asarray(batch.pop("video_mask"))
  del batch["video"]
  shape = mask.shape + (feature_dim,)
  features = (np.zeros(shape, np.float32) if seed is None
              else np.random.default_rng(seed).normal(size=shape).astype(np.float32))
  return dict(batch, features=features, features_mask=mask)
