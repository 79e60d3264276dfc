"""A run's data: the records of each split (raw video, or cached encoder features), the
train loader and evaluation batches.

With ``data.cache_features`` the frozen encoder runs once per clip of a split
and its features are cached under ``data_dir/feature_cache/<key>``; the key
covers the encoder's weights, the data set and the preprocessing. Only the
splits asked for are cached: decoding the test split never touches train.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from vsrllm_jax import sharding
from vsrllm_jax.data import feature_cache, pipeline, sources
from vsrllm_jax.models import encoders
from vsrllm_jax.models.encoders import video_encoder
from vsrllm_jax.models.vsr_model import VSRModel
from vsrllm_jax.run.setup import RunSetup


class RunData:
  """Sources and batches of a run whose encoder weights are ``params`` / ``model_state``.

  The weights are read only while a split's features are computed: call
  ``prepare`` for every split a run will read before its weights change
  hands (a train step donates them).
  """

  def __init__(self, setup: RunSetup, params, model_state):
    self.setup = setup
    self._params, self._model_state = params, model_state
    self._sources: dict[str, Any] = {}
    self._encode = None

  def prepare(self, splits) -> None:
    for split in splits:
      self.source(split)

  def source(self, split: str):
    """The records of ``split``: raw video, or cached features when configured."""
    if split not in self._sources:
      data_cfg = self.setup.config.data
      self._sources[split] = (self._cached_source(split) if data_cfg.cache_features
                              else pipeline.data_source(data_cfg, split))
    return self._sources[split]

  def train_loader(self):
    config = self.setup.config
    return pipeline.make_train_loader(config.data, self.setup.tokenizer,
                                      global_batch_size=config.batch_size, seed=config.seed,
                                      source=self.source("train"))

  def eval_batches(self, split: str, max_batches: int = -1):
    config = self.setup.config
    return pipeline.eval_batches(config.data, self.setup.tokenizer, split,
                                 global_batch_size=config.eval_batch_size,
                                 max_batches=max_batches, source=self.source(split))

  # --- the feature cache --------------------------------------------------------

  def _cached_source(self, split: str) -> feature_cache.CachedFeatureSource:
    config, model = self.setup.config, self.setup.model
    encoder_vars = {"params": self._params["encoder"],
                    "batch_stats": self._model_state.get("batch_stats", {}).get("encoder")}
    key = feature_cache.cache_key(
        encoder_digest=feature_cache.tree_digest(jax.device_get(encoder_vars)),
        encoder_config=encoders.describe(model.encoder_config),
        data_fingerprint=sources.fingerprint(config.data), split=split,
        preprocessing=dict(pixel_mean=video_encoder.PIXEL_MEAN,
                           pixel_std=video_encoder.PIXEL_STD, max_frames=config.data.max_frames,
                           image_size=config.data.image_size, dtype=config.dtype,
                           augmentation="none (eval-style: centre crop to image_size)"))
    directory = os.path.join(config.data.data_dir, "feature_cache", key)
    return feature_cache.build_or_load(directory, lambda: self._compute_features(split))

  def _compute_features(self, split: str):
    """Yields {id, text, task, features [n, D] (, cluster_counts)} per clip, in order.

    LRS3 records always carry cluster counts; they are kept whether or not this
    run deduplicates, so one cache entry serves both.
    """
    logging.info("computing encoder features for %s (cached for later runs)", split)
    setup = self.setup
    if self._encode is None:   # built once: all splits share its compilation
      self._encode = jax.jit(lambda p, s, b: setup.model.apply({"params": p, **s}, b,
                                                               method=VSRModel.encode))
    data_cfg = ml_collections.ConfigDict(setup.config.data.to_dict())
    data_cfg.use_cluster_counts = data_cfg.name == "lrs3"
    raw = pipeline.data_source(data_cfg, split)
    for batch in pipeline.eval_batches(data_cfg, setup.tokenizer, split,
                                       global_batch_size=setup.config.eval_batch_size,
                                       source=raw):
      inputs = {k: batch[k] for k in ("video", "video_mask")}
      feats, feats_mask = self._encode(self._params, self._model_state,
                                       sharding.global_batch(inputs, setup.mesh))
      feats = np.asarray(multihost_utils.process_allgather(feats, tiled=True))
      frames = np.asarray(multihost_utils.process_allgather(feats_mask, tiled=True)).sum(1)
      meta = {"mask": batch["example_mask"]}
      if data_cfg.use_cluster_counts:
        meta["counts"] = batch["cluster_counts"]
      meta = multihost_utils.process_allgather(meta, tiled=True)
      ids, texts, tasks = (_allgather_strings(batch[k]) for k in ("id", "text", "task"))
      for i in np.flatnonzero(np.asarray(meta["mask"])):
        n = int(frames[i])
        record = dict(id=ids[i], text=texts[i], features=feats[i, :n], task=tasks[i] or None)
        if "counts" in meta:
          counts = np.asarray(meta["counts"][i])
          record["cluster_counts"] = counts[counts > 0]
        yield record


def _allgather_strings(values) -> list[str]:
  """Every process's strings, in process order (single process: unchanged)."""
  values = [str(v) for v in values]
  if jax.process_count() == 1:
    return values
  encoded = np.zeros((len(values), 256), np.uint8)
  for i, v in enumerate(values):
    b = v.encode()[:256]
    encoded[i, :len(b)] = np.frombuffer(b, np.uint8)
  gathered = np.asarray(multihost_utils.process_allgather(encoded, tiled=True))
  return [bytes(row).rstrip(b"\0").decode() for row in gathered]
