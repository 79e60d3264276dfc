"""The PyTorch twins of our encoder kinds (``models.encoders``), by the name a kind gives
as its ``torch_twin``: each loads an exported encoder into a torch module that gives
our features."""
from __future__ import annotations

from typing import Any, Callable

import torch
import transformers
from safetensors.torch import load_file
from torch import nn

from vsrllm_jax.registry import Registry
from vsrllm_jax.torch_port import avhubert, video_encoder

TWINS: Registry[Callable[[str, dict], nn.Module]] = Registry("PyTorch encoder twin")


def load(twin: str, path: str, config: dict[str, Any]) -> nn.Module:
  """The exported encoder at ``path`` (its kind's format) as torch module ``twin``."""
  return TWINS.get(twin)(path, config)


@TWINS.register("fairseq_avhubert")
def _fairseq_avhubert(path: str, config: dict[str, Any]) -> nn.Module:
  encoder = avhubert.AvHubertEncoder.from_config(config)
  state = torch.load(path, map_location="cpu", weights_only=False)["model"]
  encoder.load_state_dict(avhubert.encoder_state_dict(state), strict=True)
  return encoder


@TWINS.register("compact")
def _compact(path: str, config: dict[str, Any]) -> nn.Module:
  encoder = video_encoder.VideoEncoder.from_config({k: v for k, v in config.items()
                                                    if k != "format"})
  encoder.load_state_dict(load_file(path), strict=True)
  return encoder


class HfVisionTower(nn.Module):
  """A transformers CLIP / SigLIP vision model run as our ``ImageEncoder``.

  One-frame RGB clips uint8 [B, 1, S, S, 3] (or float in [0, 1]) -> (features
  [B, N, D], mask [B, N]): pixels normalised with the export's mean/std,
  ``hidden_states[feature_layer]``, then the post-layernorm and the class-token
  drop if the export's config asks for them (``models/encoders/vision_tower.py``).
  """

  def __init__(self, tower: nn.Module, config: dict[str, Any]):
    super().__init__()
    missing = [k for k in ("image_size", "feature_layer", "drop_cls", "post_layernorm",
                           "image_mean", "image_std") if config.get(k) is None]
    if missing:
      raise ValueError(f"HfVisionTower: the encoder config lacks {missing}; expected the fields "
                       "of vsrllm_jax.models.vision_tower.VisionTowerConfig")
    self.tower = tower
    self.image_size, self.feature_layer = int(config["image_size"]), int(config["feature_layer"])
    self.drop_cls, self.post_layernorm = bool(config["drop_cls"]), bool(config["post_layernorm"])
    self.register_buffer("mean", torch.tensor(config["image_mean"], dtype=torch.float32),
                         persistent=False)
    self.register_buffer("std", torch.tensor(config["image_std"], dtype=torch.float32),
                         persistent=False)

  def forward(self, video: torch.Tensor, video_mask: torch.Tensor):
    s = self.image_size
    if video.ndim != 5 or tuple(video.shape[1:]) != (1, s, s, 3):
      raise ValueError(f"HfVisionTower: video has shape {tuple(video.shape)}, expected "
                       f"[B, 1, {s}, {s}, 3] (one-frame RGB clips at the tower's image_size)")
    x = video[:, 0]
    x = x.float() / 255.0 if not torch.is_floating_point(x) else x.float()
    x = ((x - self.mean) / self.std).permute(0, 3, 1, 2)
    x = x.to(next(self.tower.parameters()).dtype)
    out = self.tower(pixel_values=x, output_hidden_states=True)
    h = out.hidden_states[self.feature_layer]
    if self.post_layernorm:   # on the model (CLIPVisionModel, transformers 5) or vision_model
      h = getattr(self.tower, "vision_model", self.tower).post_layernorm(h)
    if self.drop_cls:
      h = h[:, 1:]
    mask = video_mask[:, 0].bool()[:, None].expand(h.shape[:2])
    return h, mask


@TWINS.register("hf_vision_tower")
def _load_vision_tower(directory: str, config: dict[str, Any]) -> HfVisionTower:
  """The exported tower through transformers' AutoModel, every weight accounted for."""
  tower, info = transformers.AutoModel.from_pretrained(directory, dtype=torch.float32,
                                                       output_loading_info=True)
  bad = {k: sorted(v) for k, v in info.items() if v}
  if bad:
    raise ValueError(f"{directory}: transformers loaded the vision tower with {bad}")
  return HfVisionTower(tower.eval(), config)
