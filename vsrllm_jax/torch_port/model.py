"""The composed model in PyTorch: encoder -> projector -> a transformers causal LM.

Loads what ``python -m vsrllm_jax.convert`` writes and decodes as our JAX side
does: the LLM reads ``[instruction][visual tokens]`` and continues it, greedy
or by beam search (transformers' ``generate``). Padding inside the prompt is
moved to the left of each row (positions count real tokens only, so the
model sees the same sequence), which is the padding ``generate`` expects.
Torch and transformers only; no JAX.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Sequence

import torch
import transformers
from safetensors.torch import load_file
from torch import nn

from vsrllm_jax.torch_port import avhubert, projectors, video_encoder

CONFIG_FILE = "vsrllm_config.json"


class HfVisionTower(nn.Module):
  """A transformers CLIP / SigLIP vision model run as our ``ImageEncoder``.

  One-frame RGB clips uint8 [B, 1, S, S, 3] (or float in [0, 1]) -> (features
  [B, N, D], mask [B, N]): pixels normalised with the export's mean/std,
  ``hidden_states[feature_layer]``, then the post-layernorm and the class-token
  drop if the export's config asks for them (``models/vision_tower.py``).
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


def _load_vision_tower(directory: str, config: dict[str, Any]) -> HfVisionTower:
  """The exported tower through transformers' AutoModel, every weight accounted for."""
  tower, info = transformers.AutoModel.from_pretrained(directory, dtype=torch.float32,
                                                       output_loading_info=True)
  bad = {k: sorted(v) for k, v in info.items() if v}
  if bad:
    raise ValueError(f"{directory}: transformers loaded the vision tower with {bad}")
  return HfVisionTower(tower.eval(), config)


class VsrLlm(nn.Module):
  """``generate(video, video_mask, task='')`` -> token ids [B, max_new_tokens] (pad after EOS).

  ``video``: what our encoder reads (clips, or one-frame RGB clips for an image tower).
  """

  def __init__(self, encoder: nn.Module, projector: nn.Module, llm: nn.Module, *,
               instructions: dict[str, Sequence[int]], eos_ids: Sequence[int], pad_id: int,
               max_new_tokens: int = 32):
    super().__init__()
    self.encoder, self.projector, self.llm = encoder, projector, llm
    self.instructions = {task: list(ids) for task, ids in instructions.items()}
    self.eos_ids, self.pad_id, self.max_new_tokens = list(eos_ids), int(pad_id), max_new_tokens
    # Gemma scales every input embedding by sqrt(hidden) inside the model; ours scales
    # token embeddings at lookup and feeds visual tokens as they are.
    hidden = llm.config.hidden_size
    self.visual_scale = (1.0 / math.sqrt(hidden)
                         if llm.config.model_type.startswith("gemma") else 1.0)

  @classmethod
  def from_export(cls, export_dir: str, *, llm_dir: str | None = None):
    """(model in eval mode, tokenizer, the export's vsrllm_config.json) from ``export_dir``."""
    path = os.path.join(export_dir, CONFIG_FILE)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path} not found: expected a directory written by "
                              "python -m vsrllm_jax.convert")
    with open(path) as f:
      meta = json.load(f)
    llm_dir = llm_dir or meta["llm"].get("reference") or os.path.join(export_dir,
                                                                      meta["llm"]["dir"])
    llm = transformers.AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(llm_dir)
    enc = meta["encoder"]
    weights = os.path.join(export_dir, enc.get("file") or enc["dir"])
    if enc["format"] == "hf_vision_tower":
      encoder = _load_vision_tower(weights, enc["config"])
    elif enc["format"] == "fairseq_avhubert":
      encoder = avhubert.AvHubertEncoder.from_config(enc["config"])
      state = torch.load(weights, map_location="cpu", weights_only=False)["model"]
      encoder.load_state_dict(avhubert.encoder_state_dict(state), strict=True)
    else:
      encoder = video_encoder.VideoEncoder.from_config(
          {k: v for k, v in enc["config"].items() if k != "format"})
      encoder.load_state_dict(load_file(weights), strict=True)
    proj = meta["projector"]
    projector = projectors.build(proj["config"]["name"], proj["config"], proj["output_dim"],
                                 enc["feature_dim"])
    projector.load_state_dict(load_file(os.path.join(export_dir, proj["file"])), strict=True)
    model = cls(encoder, projector, llm,
                instructions={t: v["ids"] for t, v in meta["instructions"].items()},
                eos_ids=meta["tokenizer"]["eos_ids"], pad_id=meta["tokenizer"]["pad_id"],
                max_new_tokens=int(meta["decode"].get("max_new_tokens", 32)))
    return model.eval(), tokenizer, meta

  def _instruction(self, task: str, batch: int, device) -> torch.Tensor:
    if task not in self.instructions:
      raise ValueError(f"task {task!r} has no instruction in this export; it has "
                       f"{sorted(self.instructions)}")
    ids = torch.tensor(self.instructions[task], dtype=torch.long, device=device)
    return ids[None].expand(batch, -1)

  def prompt(self, video: torch.Tensor, video_mask: torch.Tensor, task: str = ""):
    """``[instruction][visual tokens]`` embeddings [B, P, E] and mask [B, P], left-padded."""
    video_mask = video_mask.bool()
    feats = self.encoder(video, video_mask)
    if isinstance(feats, tuple):   # an image tower: its own tokens and mask
      feats, video_mask = feats
    ids = self._instruction(task, video.shape[0], video.device)
    embed = self.llm.get_input_embeddings()
    instr = embed(ids)
    instr_mask = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    out = self.projector(feats, video_mask, text=instr * self._lookup_scale(),
                         text_mask=instr_mask) if self.projector.text_aware else \
        self.projector(feats, video_mask)
    tokens = out.tokens.to(instr.dtype) * self.visual_scale
    embeds = torch.cat([instr, tokens], dim=1)
    mask = torch.cat([instr_mask, out.mask.bool()], dim=1)
    order = torch.argsort(mask.to(torch.int8), dim=1, stable=True)   # padding first, in order
    embeds = torch.take_along_dim(embeds, order[..., None], dim=1)
    return embeds, torch.take_along_dim(mask, order, dim=1)

  def _lookup_scale(self) -> float:
    """What our embedding lookup multiplies by (Gemma: sqrt(hidden)); HF's layer does not."""
    return 1.0 / self.visual_scale

  @torch.no_grad()
  def generate(self, video: torch.Tensor, video_mask: torch.Tensor, task: str = "", *,
               max_new_tokens: int | None = None, strategy: str = "greedy",
               beam_size: int = 4, length_penalty: float = 1.0,
               early_stopping: bool | str = "heuristic") -> torch.Tensor:
    """Token ids [B, max_new_tokens] with ``pad_id`` after each row's first EOS.

    Beam options as our ``config.decode``: ``early_stopping`` True, 'heuristic'
    (transformers' False) or 'never'.
    """
    n = max_new_tokens or self.max_new_tokens
    embeds, mask = self.prompt(video, video_mask, task)
    options: dict[str, Any] = dict(max_new_tokens=n, do_sample=False,
                                   eos_token_id=self.eos_ids, pad_token_id=self.pad_id)
    if strategy == "beam":
      options.update(num_beams=beam_size, length_penalty=length_penalty,
                     early_stopping={"heuristic": False}.get(early_stopping, early_stopping))
    elif strategy != "greedy":
      raise ValueError(f"strategy {strategy!r}: the PyTorch side decodes 'greedy' or 'beam'")
    out = self.llm.generate(inputs_embeds=embeds, attention_mask=mask.long(), **options)
    out = out[:, -n:] if out.shape[1] > n else out
    tokens = torch.full((out.shape[0], n), self.pad_id, dtype=torch.long, device=out.device)
    tokens[:, :out.shape[1]] = out
    eos = torch.isin(tokens, torch.tensor(self.eos_ids, device=tokens.device))
    after = (torch.cumsum(eos.int(), dim=1) - eos.int()) > 0      # strictly after the first EOS
    return tokens.masked_fill(after, self.pad_id)
