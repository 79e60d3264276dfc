"""Pretrains the embedded default video encoder on synthetic lips (per-frame visemes).

  python -m vsrllm_jax.tools.pretrain_encoder --out_dir=/tmp/avhubert_small --steps=1200

The encoder (sizes from ``configs/common.py``) plus a linear per-frame head
learns each frame's viseme (``viseme_ids``) with cross-entropy over real
frames. Only TRAINING speakers are ever read for training or for batch-norm
statistics; a held-out slice of train clips (seen speakers, unseen clips) and
the validation and test splits (unseen speakers) are only evaluated, after
training. The head is discarded; the encoder is saved with
an encoder directory (``formats.encoder_dir``). Deterministic for a seed (same machine).
"""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vsrllm_jax.configs.common import get_base_config
from vsrllm_jax.data import pipeline
from vsrllm_jax.data.synthetic import visemes as visemes_lib
from vsrllm_jax.models import encoders
from vsrllm_jax.models.encoders.video_encoder import VideoEncoder, VideoEncoderConfig

NUM_CLASSES = len(visemes_lib.VISEMES)


class FrameClassifier(nn.Module):
  """VideoEncoder + linear per-frame viseme head. -> logits [B, T, NUM_CLASSES]."""
  encoder_config: VideoEncoderConfig

  @nn.compact
  def __call__(self, video, mask, train: bool = False):
    feats = VideoEncoder(self.encoder_config, name="encoder")(video, mask, train)
    return nn.Dense(NUM_CLASSES, name="head")(feats)


def load_split(data_cfg, split: str, indices=None) -> dict[str, np.ndarray]:
  """Padded arrays of a split: video [N, T, H, W, 1] uint8, mask [N, T], labels [N, T]."""
  source = pipeline.data_source(data_cfg, split)
  indices = range(len(source)) if indices is None else indices
  t, s = int(data_cfg.max_frames), int(data_cfg.image_size)
  n = len(indices)
  video = np.zeros((n, t, s, s, 1), np.uint8)
  labels = np.zeros((n, t), np.int32)
  lengths = np.zeros((n,), np.int32)
  for row, index in enumerate(indices):
    record = source[int(index)]
    if "viseme_ids" not in record:
      raise ValueError(f"{split} record {index} has no 'viseme_ids': regenerate the data with "
                       "the current synthetic_lips (GENERATOR_VERSION >= 2)")
    frames, ids = record["video"], record["viseme_ids"]
    if ids.shape[0] != frames.shape[0]:
      raise ValueError(f"{split} record {index}: {ids.shape[0]} viseme_ids for "
                       f"{frames.shape[0]} frames")
    video[row, :len(frames)] = frames
    labels[row, :len(ids)] = ids
    lengths[row] = len(frames)
  return {"video": video, "mask": np.arange(t)[None] < lengths[:, None], "labels": labels}


def augment(key, video, mask):
  """Per-clip zoom, sub-pixel shift, contrast, brightness and noise. uint8 [B, T, H, W, 1].

  Speakers differ in mouth size, position, gray levels and camera noise;
  varying these within the training speakers makes the encoder lean on the
  mouth's shape (measured: +1.6 / +2.2 points frame accuracy on validation /
  test speakers at the default budget).
  """
  b, _, h, w, _ = video.shape
  k = jax.random.split(key, 6)
  x = video.astype(jnp.float32)
  # Zoom and shift around the skin colour (top row), which fills the exposed border.
  m = mask.astype(jnp.float32)[:, :, None, None, None]               # [B, T, 1, 1, 1]
  bg = (jnp.sum(x[:, :, :1] * m, axis=(1, 2, 3, 4), keepdims=True)
        / jnp.maximum(jnp.sum(m, axis=1, keepdims=True) * w, 1.0))    # [B, 1, 1, 1, 1]
  zoom = jax.random.uniform(k[0], (b,), minval=0.88, maxval=1.12)
  shift = jax.random.uniform(k[1], (b, 2), minval=-2.0, maxval=2.0)   # pixels (y, x)

  def warp(clip, sc, sh):                                            # clip [T, H, W, 1]
    centre = jnp.array([h, w], jnp.float32) / 2
    return jax.image.scale_and_translate(clip, clip.shape, (1, 2), jnp.stack([sc, sc]),
                                         centre - sc * centre + sh, "linear", antialias=False)
  x = jax.vmap(warp)(x - bg, zoom, shift) + bg
  contrast = jax.random.uniform(k[2], (b, 1, 1, 1, 1), minval=0.7, maxval=1.3)
  brightness = jax.random.uniform(k[3], (b, 1, 1, 1, 1), minval=-25.0, maxval=25.0)
  noise_std = jax.random.uniform(k[4], (b, 1, 1, 1, 1), maxval=4.0)
  noise = noise_std * jax.random.normal(k[5], x.shape)
  x = (x - 128.0) * contrast + 128.0 + brightness + noise
  x = jnp.where(mask[:, :, None, None, None], x, 0.0)
  return jnp.clip(jnp.round(x), 0, 255).astype(jnp.uint8)


def crop_batch(arrays, rows, crop_frames: int, rng: np.random.Generator) -> dict:
  """Rows of ``arrays``, each cut to a random window of ``crop_frames`` real frames.

  Fixed-length windows waste no compute on padding (clips are ~75% real
  frames); a clip shorter than the window keeps all its frames, padded.
  """
  lengths = arrays["mask"][rows].sum(1)
  starts = rng.integers(0, np.maximum(lengths - crop_frames, 0) + 1)
  take = starts[:, None] + np.arange(crop_frames)[None]                # [B, crop]
  take = np.minimum(take, arrays["mask"].shape[1] - 1)
  out = {k: v[rows[:, None], take] for k, v in arrays.items()}
  out["mask"] = out["mask"] & (take < (starts + lengths)[:, None])
  return out


def _decay_mask(params):
  return jax.tree.map(lambda p: p.ndim > 1, params)                 # kernels only


def _masked_xent(logits, labels, mask):
  """Mean cross-entropy and number of correct frames over real frames."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  m = mask.astype(jnp.float32)
  loss = jnp.sum(ce * m) / jnp.maximum(jnp.sum(m), 1.0)
  correct = jnp.sum((jnp.argmax(logits, -1) == labels) * m)
  return loss, correct


def make_train_step(model: FrameClassifier, tx: optax.GradientTransformation, augmentation: bool):
  """Jitted (state, batch, key) -> (state, metrics); batch norm in train mode."""

  def step(state, batch, key):
    video = augment(key, batch["video"], batch["mask"]) if augmentation else batch["video"]

    def loss_fn(params):
      logits, updates = model.apply({"params": params, "batch_stats": state["batch_stats"]},
                                    video, batch["mask"], train=True, mutable=["batch_stats"])
      loss, correct = _masked_xent(logits, batch["labels"], batch["mask"])
      return loss, (updates["batch_stats"], correct)

    (loss, (batch_stats, correct)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new_state = {"params": optax.apply_updates(state["params"], updates),
                 "batch_stats": batch_stats, "opt_state": opt_state}
    accuracy = correct / jnp.maximum(jnp.sum(batch["mask"]), 1)
    return new_state, {"loss": loss, "accuracy": accuracy}

  return jax.jit(step, donate_argnums=0)


def make_correct_count(model: FrameClassifier):
  """Jitted (variables, video, mask, labels) -> correct real frames; eval-mode batch norm."""
  return jax.jit(lambda v, video, mask, labels: _masked_xent(
      model.apply(v, video, mask), labels, mask)[1])


def frame_accuracy(correct_count, variables, arrays, batch_size: int) -> float:
  """Argmax accuracy over the real frames of ``arrays`` (from ``make_correct_count``)."""
  n = len(arrays["video"])
  correct = 0.0
  for start in range(0, n, batch_size):
    rows = {k: v[start:start + batch_size] for k, v in arrays.items()}
    pad = batch_size - len(rows["video"])
    if pad:  # keep one compiled shape: padded rows have no real frames
      rows = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
              for k, v in rows.items()}
    correct += float(correct_count(variables, rows["video"], rows["mask"], rows["labels"]))
  return correct / max(int(arrays["mask"].sum()), 1)


def pretrain_encoder(data_cfg, encoder_cfg: VideoEncoderConfig, *, steps: int, batch_size: int,
                     learning_rate: float, seed: int, out_dir=None, warmup_fraction: float = 0.05,
                     weight_decay: float = 0.05, heldout_train_clips: int | None = None,
                     augmentation: bool = True, crop_frames: int = 32, eval_batch_size: int = 32,
                     log_every: int = 0) -> dict[str, Any]:
  """Trains encoder + head on the train split, evaluates, saves the encoder to ``out_dir``.

  ``crop_frames`` (0: whole clips) is the training window length; evaluation
  always reads whole clips. ``heldout_train_clips`` (default: 5% of train, at
  most 200) are the last train clips, never trained on; they give
  ``train_frame_accuracy`` (seen speakers, unseen clips).
  Returns {'train_frame_accuracy', 'validation_frame_accuracy',
  'test_frame_accuracy', 'steps', 'seconds', ...}.
  """
  start_time = time.time()
  num_train = pipeline.split_size(data_cfg, "train")
  heldout = (min(200, max(1, num_train // 20)) if heldout_train_clips is None
             else int(heldout_train_clips))
  if not 0 <= heldout < num_train:
    raise ValueError(f"heldout_train_clips={heldout} must be in [0, {num_train})")
  train = load_split(data_cfg, "train", range(num_train - heldout))
  n = len(train["video"])
  if batch_size > n:
    raise ValueError(f"batch_size={batch_size} > {n} training clips")

  model = FrameClassifier(encoder_cfg)
  # XLA's RngBitGenerator: same numbers for a seed on a given backend, and it
  # compiles in seconds where threefry takes ~10 s for the init alone on CPU.
  init_rng, step_rng = jax.random.split(jax.random.key(seed, impl="rbg"))
  variables = jax.jit(model.init)(init_rng, train["video"][:1], train["mask"][:1])
  variables = nn.meta.unbox(variables)
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, learning_rate, max(1, int(warmup_fraction * steps)), max(steps, 2),
      end_value=0.02 * learning_rate)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=weight_decay,
                               mask=_decay_mask))
  state = {"params": variables["params"], "batch_stats": variables["batch_stats"],
           "opt_state": tx.init(variables["params"])}
  train_step = make_train_step(model, tx, augmentation)

  order_rng = np.random.default_rng(seed)
  order, cursor = order_rng.permutation(n), 0
  train_start = time.time()
  for step in range(steps):
    if cursor + batch_size > n:
      order, cursor = order_rng.permutation(n), 0
    rows = order[cursor:cursor + batch_size]
    cursor += batch_size
    if crop_frames:
      batch = crop_batch(train, rows, crop_frames, order_rng)
    else:
      batch = {k: v[rows] for k, v in train.items()}
    state, metrics = train_step(state, batch, jax.random.fold_in(step_rng, step))
    if log_every and (step + 1) % log_every == 0:
      print(f"step {step + 1}: loss {float(metrics['loss']):.4f} "
            f"acc {float(metrics['accuracy']):.3f} ({time.time() - train_start:.0f}s)",
            flush=True)
  jax.block_until_ready(state)
  train_seconds = time.time() - train_start

  final = {"params": state["params"], "batch_stats": state["batch_stats"]}
  correct_count = make_correct_count(model)
  results = {}
  splits = {"train": ("train", range(num_train - heldout, num_train)),
            "validation": ("validation", None), "test": ("test", None)}
  for name, (split, indices) in splits.items():
    if indices is not None and not len(indices):
      results[f"{name}_frame_accuracy"] = float("nan")
      continue
    arrays = load_split(data_cfg, split, indices)
    results[f"{name}_frame_accuracy"] = frame_accuracy(correct_count, final, arrays,
                                                       eval_batch_size)

  encoder_variables = jax.tree.map(np.asarray, {
      "params": final["params"]["encoder"], "batch_stats": final["batch_stats"]["encoder"]})
  if out_dir:
    encoders.KINDS.get("compact").save(out_dir, encoder_cfg, encoder_variables)
  results.update(
      steps=int(steps), seconds=time.time() - start_time, train_seconds=train_seconds,
      encoder_params=int(sum(x.size for x in jax.tree.leaves(encoder_variables["params"]))),
      heldout_train_clips=heldout, training_clips=n)
  return results


FLAGS = flags.FLAGS


def define_flags(flag_values=flags.FLAGS) -> None:
  """The tool's flags, defined only when run as a program (see train.define_flags); importing
  this module (make_embedded does) defines none."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string("out_dir", None, "Where the encoder directory (config.json + "
                      "model.safetensors) is written; unset: train and evaluate only.", **fv)
  flags.DEFINE_integer("steps", 1200, "Training steps.", **fv)
  flags.DEFINE_integer("batch_size", 8, "Clips per step.", **fv)
  flags.DEFINE_float("learning_rate", 3e-3, "Peak AdamW learning rate (warmup, then cosine "
                     "decay).", **fv)
  flags.DEFINE_integer("crop_frames", 32, "Training window in frames (0: whole clips); "
                       "evaluation always reads whole clips.", **fv)
  flags.DEFINE_bool("augment", True, "Random zoom/shift/contrast/brightness/noise per "
                    "training clip.", **fv)
  flags.DEFINE_integer("seed", 0, "Seed of the init, the data order and the augmentation.",
                       **fv)
  flags.DEFINE_string("data_dir", "", "Synthetic data directory ('' -> the default).", **fv)
  flags.DEFINE_string("encoder_overrides", "",
                      "JSON object of VideoEncoderConfig fields replacing configs/common.py's, "
                      """e.g. '{"hidden_dim": 128, "mlp_dim": 256}'.""", **fv)
  flags.DEFINE_integer("log_every", 100, "Print the training loss every N steps (0: never).",
                       **fv)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  base = get_base_config()
  data_cfg = base.data
  if FLAGS.data_dir:
    data_cfg.data_dir = FLAGS.data_dir
  encoder_cfg = VideoEncoderConfig.from_config_dict(base.encoder)
  if FLAGS.encoder_overrides:
    overrides = {k: (tuple(v) if isinstance(v, list) else v)
                 for k, v in json.loads(FLAGS.encoder_overrides).items()}
    encoder_cfg = dataclasses.replace(encoder_cfg, **overrides)
  metrics = pretrain_encoder(data_cfg, encoder_cfg, steps=FLAGS.steps,
                             batch_size=FLAGS.batch_size, learning_rate=FLAGS.learning_rate,
                             seed=FLAGS.seed, out_dir=FLAGS.out_dir, log_every=FLAGS.log_every,
                             crop_frames=FLAGS.crop_frames, augmentation=FLAGS.augment)
  metrics["encoder_config"] = dataclasses.asdict(encoder_cfg)
  print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
  define_flags()
  app.run(main)
