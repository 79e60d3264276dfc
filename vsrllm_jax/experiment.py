"""Everything a run needs, built once from a config; shared by train and decode.

Resolves the config (tokenizer, vocab size, data dir), builds the mesh, the
model and its sharded state (with pretrained encoder / LLM weights when the
config names them), and the data: raw video through the encoder, or cached
encoder features (``data.cache_features``), computed once per encoder, data
set and preprocessing.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from vsrllm_jax import optim, resolve, sharding, throughput, train_state, train_step
from vsrllm_jax.data import feature_cache, pipeline, sources
from vsrllm_jax.data import tokenizer as tokenizer_lib
from vsrllm_jax.models import build as build_lib
from vsrllm_jax.models import encoders
from vsrllm_jax.models import llm as llm_lib
from vsrllm_jax.models import video_encoder
from vsrllm_jax.models.vsr_model import VSRModel


def _pretrained(config, mesh):
  """Pretrained weights named by the config: (params, model_state).

  The LLM is read straight into its shardings on ``mesh`` (no host copy of the
  whole model); the small encoder comes as host trees.
  """
  params, model_state = {}, {}
  if config.llm.path:
    # Read in the frozen storage dtype: an 8B LLM never exists in fp32 when it is
    # stored bf16 (params a param group trains are cast up in train_state.create).
    _, params["llm"] = llm_lib.from_pretrained(
        config.llm.path, dtype=config.dtype, param_dtype=train_state.frozen_dtype(config),
        mesh=mesh, rules=sharding.rules(config))
  variables = encoders.load_pretrained(config.encoder)
  if variables is not None:
    params["encoder"] = variables["params"]
    if variables.get("batch_stats"):
      model_state["batch_stats"] = {"encoder": variables["batch_stats"]}
  return params, model_state


class Experiment:
  """Config -> tokenizer, mesh, model, sharded state, optimizer and data."""

  def __init__(self, config):
    self.config, self.tokenizer = resolve.resolve_config(config)
    # Decoding stops at any of these (an instruct checkpoint's end-of-turn too).
    self.eos_ids = tokenizer_lib.special_tokens(
        self.tokenizer, chat_template=self.config.data.get("chat_template", False)).eos_ids
    config = self.config
    self.mesh = sharding.make_mesh(config.mesh.shape)
    data_parallel = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    for key in ("batch_size", "eval_batch_size"):
      if config[key] % data_parallel:
        raise ValueError(f"config.{key}={config[key]} is not divisible by the {data_parallel} "
                         "data-parallel devices (mesh data x fsdp)")
    logging.info("mesh %s on %d devices", dict(self.mesh.shape), self.mesh.size)
    self.model: VSRModel = build_lib.build_model(config)
    params, model_state = _pretrained(config, self.mesh)
    (self.state, self.state_shardings, self.labels, self.tx,
     self.schedules) = train_state.create_with_optimizer(
         self.model, config, self.mesh, pretrained_params=params,
         pretrained_model_state=model_state)
    self._sources: dict[str, Any] = {}
    self._predict = None
    self._encode = None
    self._flops: dict[Any, dict[str, float]] = {}
    if config.data.cache_features:
      # Before any train step donates the state's buffers.
      for split in ("train", "validation", "test"):
        self.source(split)

  # --- data -------------------------------------------------------------------

  def source(self, split: str):
    """The records of ``split``: raw video, or cached features when configured."""
    if split not in self._sources:
      self._sources[split] = (self._cached_source(split) if self.config.data.cache_features
                              else pipeline.data_source(self.config.data, split))
    return self._sources[split]

  def train_loader(self):
    return pipeline.make_train_loader(self.config.data, self.tokenizer,
                                      global_batch_size=self.config.batch_size,
                                      seed=self.config.seed, source=self.source("train"))

  def eval_batches(self, split: str, max_batches: int = -1):
    return pipeline.eval_batches(self.config.data, self.tokenizer, split,
                                 global_batch_size=self.config.eval_batch_size,
                                 max_batches=max_batches, source=self.source(split))

  def _cached_source(self, split: str) -> feature_cache.CachedFeatureSource:
    config = self.config
    encoder_vars = {"params": self.state.params["encoder"],
                    "batch_stats": self.state.model_state.get("batch_stats", {}).get("encoder")}
    key = feature_cache.cache_key(
        encoder_digest=feature_cache.tree_digest(jax.device_get(encoder_vars)),
        encoder_config=encoders.describe(self.model.encoder_config),
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
    encode = self._encode_fn()
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    data_cfg = ml_collections.ConfigDict(self.config.data.to_dict())
    data_cfg.use_cluster_counts = data_cfg.name == "lrs3"
    raw = pipeline.data_source(data_cfg, split)
    for batch in pipeline.eval_batches(data_cfg, self.tokenizer, split,
                                       global_batch_size=self.config.eval_batch_size,
                                       source=raw):
      inputs = {k: batch[k] for k in ("video", "video_mask")}
      feats, feats_mask = encode(self.state.params, self.state.model_state,
                                 sharding.global_batch(inputs, self.mesh))
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

  # --- models -----------------------------------------------------------------

  def _encode_fn(self):
    """The jitted frozen encoder, built once (all splits share its compilation)."""
    if self._encode is None:
      self._encode = jax.jit(lambda p, s, b: self.model.apply({"params": p, **s}, b,
                                                              method=VSRModel.encode))
    return self._encode

  def predict_fn(self):
    if self._predict is None:
      self._predict = train_step.make_predict_fn(self.model, self.config,
                                                 eos_id=self.eos_ids,
                                                 pad_id=self.tokenizer.pad_token_id,
                                                 mesh=self.mesh)
    return self._predict

  def train_step_fn(self):
    train_step.check_loss_weights(self.model, self.state, self.config,
                                  self._shape_batch(self.config.batch_size))
    return train_step.make_train_step(self.model, self.tx, self.labels, self.config,
                                      self.schedules, self.state_shardings, self.mesh)

  def step_flops(self, batch) -> dict[str, float]:
    """FLOPs of one train step on ``batch``'s shapes: ``model_flops`` (analytic),
    ``hardware_flops`` (XLA's count; 0 unless config.log_hfu) and ``llm_tokens``."""
    key = tuple(sorted((k, tuple(v.shape)) for k, v in batch.items()))
    if key not in self._flops:
      abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=getattr(v, "sharding", None))
                  for k, v in batch.items()}
      llm_trained = any(path[0] == "llm" and label is not optim.FROZEN
                        for path, label in self.labels.items())
      model = throughput.model_flops(self.model, self.state.params, self.state.model_state,
                                     abstract, llm_trained=llm_trained)
      hardware = 0.0
      if self.config.get("log_hfu", True):
        config = self.config.copy_and_resolve_references()
        with config.unlocked():
          config.grad_accum_steps = 1   # XLA would count a micro-batch loop's body once
        hardware = throughput.hardware_flops(
            lambda: train_step.make_train_step(throughput.counting_model(self.model), self.tx,
                                               self.labels, config,
                                               self.schedules, self.state_shardings, self.mesh),
            self.state, abstract)
      self._flops[key] = dict(model_flops=model["total"], hardware_flops=hardware,
                              llm_tokens=model["llm_tokens"])
      logging.info("train step FLOPs for %s: model %.4g (llm %.4g, projector %.4g, encoder "
                   "%.4g), hardware (XLA) %.4g", dict(key), model["total"], model["llm"],
                   model["projector"], model["encoder"], hardware)
    return self._flops[key]

  def _shape_batch(self, batch_size: int) -> dict:
    batch = train_state.dummy_batch(self.config, batch_size)
    if self.config.data.cache_features:
      dim = encoders.feature_dim(self.model.encoder_config)
      batch["features"] = np.zeros(batch["video_mask"].shape + (dim,), np.float32)
      batch["features_mask"] = batch.pop("video_mask")
      del batch["video"]
    return batch


def _allgather_strings(values) -> list[str]:
  """Every process's strings, in process order (single process: unchanged)."""
  values = [str(v) for v in values]
  if jax.process_count() == 1:
    return values
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  encoded = np.zeros((len(values), 256), np.uint8)
  for i, v in enumerate(values):
    b = v.encode()[:256]
    encoded[i, :len(b)] = np.frombuffer(b, np.uint8)
  gathered = np.asarray(multihost_utils.process_allgather(encoded, tiled=True))
  return [bytes(row).rstrip(b"\0").decode() for row in gathered]
