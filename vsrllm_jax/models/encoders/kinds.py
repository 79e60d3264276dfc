"""The encoder kinds this package ships (``registry``):

  fairseq_avhubert  encoder.name='avhubert', path=FILE.pt: AV-HuBERT as fairseq
                    computes it (``avhubert``), the public checkpoints read through
                    ``formats.fairseq_avhubert``; exported as a fairseq .pt
  compact           encoder.name='avhubert' (or 'compact'), path=DIR or '': the
                    compact AV-HuBERT-shape encoder (``video_encoder``; the embedded
                    default) in an encoder directory, or random init of the config's
                    keys; exported in torch layout for its PyTorch twin
  vision_tower      encoder.name='vision_tower', path=DIR: a CLIP / SigLIP tower from
                    a Hugging Face directory (``vision_tower``, ``formats.hf_vision``),
                    for images (one-frame RGB clips); exported as a Hugging Face dir
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vsrllm_jax.formats import encoder_dir, fairseq_avhubert, hf_vision, safetensors_io
from vsrllm_jax.formats import torch_layout
from vsrllm_jax.models.encoders.avhubert import AvHubertConfig, AvHubertEncoder
from vsrllm_jax.models.encoders.registry import EncoderKind, register
from vsrllm_jax.models.encoders.video_encoder import VideoEncoder, VideoEncoderConfig
from vsrllm_jax.models.encoders.vision_tower import VisionTower, VisionTowerConfig

COMPACT_EXPORT_FILE = "encoder.safetensors"


def _is_pt(encoder_cfg) -> bool:
  return str(encoder_cfg.get("path") or "").endswith(".pt")


class FairseqAvHubert(EncoderKind):
  name = "fairseq_avhubert"
  config_type = AvHubertConfig
  torch_twin = "fairseq_avhubert"
  export_file = "encoder.pt"

  def accepts(self, encoder_cfg) -> bool:
    return _is_pt(encoder_cfg)

  def read_config(self, encoder_cfg):
    config = fairseq_avhubert.read_config(encoder_cfg["path"],
                                          layer_norm_first=encoder_cfg.get("layer_norm_first"))
    remat = encoder_cfg.get("remat_policy")
    return dataclasses.replace(config, remat_policy=remat) if remat else config

  def build(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32) -> nn.Module:
    return AvHubertEncoder(config, dtype=dtype, param_dtype=param_dtype)

  def load(self, encoder_cfg, config):
    _, variables = fairseq_avhubert.load(encoder_cfg["path"],
                                         layer_norm_first=encoder_cfg.get("layer_norm_first"))
    return variables

  def export(self, out_dir, config, variables, encoder_cfg):
    fairseq_avhubert.save(os.path.join(out_dir, self.export_file), config, variables)
    return {"file": self.export_file, "format": "fairseq_avhubert"}

  def import_export(self, export_dir, entry, encoder_cfg, workdir):
    path = os.path.abspath(os.path.join(export_dir, entry["file"]))
    _, variables = fairseq_avhubert.load(path)
    return {"path": path}, variables


class Compact(EncoderKind):
  name = "compact"
  config_type = VideoEncoderConfig
  torch_twin = "compact"

  def accepts(self, encoder_cfg) -> bool:
    return not _is_pt(encoder_cfg)

  def build(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32) -> nn.Module:
    return VideoEncoder(config, dtype=dtype, param_dtype=param_dtype)

  def _layouts(self, config) -> dict[str, torch_layout.TorchLayout]:
    module = self.build(config)
    sample = self.sample_input(config)
    boxed = jax.eval_shape(module.init, jax.random.key(0), *sample)
    variables = nn.meta.unbox(boxed)
    return {c: torch_layout.plan(module, boxed[c], variables=variables, args=sample)
            for c in encoder_dir.COLLECTIONS if c in boxed}

  def export(self, out_dir, config, variables, encoder_cfg):
    """Torch layout (params and batch-norm statistics beside them), for its twin."""
    tensors = {}
    for collection, layout in self._layouts(config).items():
      tensors.update(torch_layout.to_state_dict(variables[collection], layout))
    safetensors_io.write(os.path.join(out_dir, COMPACT_EXPORT_FILE), tensors)
    return {"file": COMPACT_EXPORT_FILE, "format": "torch_layout"}

  def import_export(self, export_dir, entry, encoder_cfg, workdir):
    """Read back from torch layout, written as an encoder directory of the new run."""
    config = self.config_from_json({k: v for k, v in entry["config"].items() if k != "format"})
    state = safetensors_io.read_all(os.path.join(export_dir, entry["file"]))
    variables = {}
    for collection, layout in self._layouts(config).items():
      keys = {r.theirs.replace("{i}", str(i)) for r in layout.rules
              for i in range(layout.shapes[r.ours][0] if r.stacked else 1)}
      variables[collection] = torch_layout.from_state_dict(
          {k: v for k, v in state.items() if k in keys}, layout)
    variables.setdefault("batch_stats", {})
    path = os.path.join(os.path.abspath(workdir), "encoder")
    self.save(path, config, variables)
    return {"path": path}, variables


class ImageEncoder(nn.Module):
  """One-frame RGB clips [B, 1, S, S, 3] -> the tower's (features [B, N, D], mask [B, N])."""
  config: VisionTowerConfig

  @nn.compact
  def __call__(self, video, video_mask, train: bool = False):
    return VisionTower(self.config, name="tower")(video[:, 0], video_mask[:, 0], train)


class HfVisionTower(EncoderKind):
  name = "vision_tower"
  config_type = VisionTowerConfig
  torch_twin = "hf_vision_tower"
  _OVERRIDES = ("feature_layer", "drop_cls", "post_layernorm")

  def _overrides(self, encoder_cfg) -> dict[str, Any]:
    return {k: encoder_cfg[k] for k in self._OVERRIDES if encoder_cfg.get(k) is not None}

  def read_config(self, encoder_cfg):
    if not encoder_cfg.get("path"):
      raise ValueError("config encoder.name='vision_tower' needs encoder.path: a local CLIP or "
                       "SigLIP checkpoint directory")
    return hf_vision.read_config(encoder_cfg["path"], **self._overrides(encoder_cfg))

  def feature_dim(self, config) -> int:
    return config.hidden_size

  def build(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32) -> nn.Module:
    del dtype, param_dtype   # the tower's dtypes live in its config
    return ImageEncoder(config)

  def sample_input(self, config):
    s = config.image_size
    return (jax.ShapeDtypeStruct((1, 1, s, s, 3), jnp.uint8),
            jax.ShapeDtypeStruct((1, 1), jnp.bool_))

  def load(self, encoder_cfg, config):
    if not encoder_cfg.get("path"):
      return None
    _, params = hf_vision.from_pretrained_vision(encoder_cfg["path"],
                                                 **self._overrides(encoder_cfg))
    return {"params": {"tower": params}, "batch_stats": {}}

  def export(self, out_dir, config, variables, encoder_cfg):
    source = encoder_cfg.get("path") or ""
    if not os.path.isdir(source):
      raise FileNotFoundError(f"the run's config encoder.path={source!r} is not a directory: "
                              "exporting a vision tower needs the Hugging Face directory it was "
                              "loaded from (for the layers and heads the run never loaded)")
    hf_vision.save_vision_tower(os.path.join(out_dir, "encoder"), config,
                                variables["params"]["tower"], source)
    return {"dir": "encoder", "format": "hf_vision_tower"}

  def import_export(self, export_dir, entry, encoder_cfg, workdir):
    updates = {"path": os.path.abspath(os.path.join(export_dir, entry["dir"]))}
    encoder_cfg = {**dict(encoder_cfg), **updates}
    return updates, self.load(encoder_cfg, self.read_config(encoder_cfg))


register(FairseqAvHubert(), aliases=("avhubert",))
register(Compact(), aliases=("avhubert",))
register(HfVisionTower())
