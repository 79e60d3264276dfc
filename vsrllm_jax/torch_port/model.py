"""The composed model in PyTorch: encoder -> projector -> a transformers causal LM.

Loads what ``python -m vsrllm_jax.convert`` writes and decodes as our JAX side
does: the LLM reads ``[instruction][visual tokens]`` and continues it, greedy
or by beam search (transformers' ``generate``). Padding inside the prompt is
moved to the left of each row (positions count real tokens only, so the
model sees the same sequence), which is the padding ``generate`` expects.
Given cluster counts, a sequence-preserving projector's tokens are averaged
over runs of frames (VSP-LLM deduplication), as ``models/deduplication.py``
does. A LoRA export in PEFT form is put on the LLM with ``peft`` and merged.
Torch, transformers (and peft for such exports) only; no JAX.
"""
from __future__ import annotations

import math
import os
from typing import Any, Sequence

import torch
import transformers
from safetensors.torch import load_file
from torch import nn

from vsrllm_jax.formats import export_bundle
from vsrllm_jax.torch_port import encoders, projectors

def average_runs(tokens: torch.Tensor, mask: torch.Tensor, counts: torch.Tensor):
  """tokens [B, T, E], mask [B, T], counts [B, T'] run lengths (0-padded) -> (tokens
  [B, T, E], mask [B, T]): slot k is the mean of the real frames of run k (frames past
  ``sum(counts)`` ignored); ``deduplication.average_runs``, in torch."""
  b, t, _ = tokens.shape
  ends = torch.cumsum(counts.to(tokens.device).long(), dim=1)                # [B, T']
  frame = torch.arange(t, device=tokens.device)
  run_of_frame = torch.searchsorted(ends, frame.expand(b, t).contiguous(), right=True)
  frame_ok = mask.bool() & (frame[None] < ends[:, -1:])
  onehot = (run_of_frame[:, None, :] == frame[None, :, None]) & frame_ok[:, None, :]
  weights = onehot.float()                                                  # [B, runs, frames]
  n = weights.sum(dim=-1, keepdim=True)
  out = torch.einsum("brt,bte->bre", weights / n.clamp(min=1), tokens.float())
  return out.to(tokens.dtype), n[..., 0] > 0


def _with_adapter(llm: nn.Module, adapter_dir: str) -> nn.Module:
  """The LLM with a PEFT LoRA adapter put on and merged into its kernels."""
  try:
    import peft  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"{adapter_dir} is a PEFT adapter (convert --lora_export=peft); reading "
                      "it needs peft (pip install peft)") from e
  return peft.PeftModel.from_pretrained(llm, adapter_dir).merge_and_unload()


class VsrLlm(nn.Module):
  """``generate(video, video_mask, task='', cluster_counts=None)`` -> token ids
  [B, max_new_tokens] (pad after EOS).

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
    meta = export_bundle.read(export_dir)
    llm_dir = llm_dir or export_bundle.llm_dir(export_dir, meta)
    llm = transformers.AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32)
    adapter = export_bundle.lora_adapter_dir(export_dir, meta)
    if adapter is not None:
      llm = _with_adapter(llm, adapter)
    tokenizer = transformers.AutoTokenizer.from_pretrained(llm_dir)
    enc = meta["encoder"]
    encoder = encoders.load(export_bundle.torch_twin(meta),
                            export_bundle.encoder_path(export_dir, meta), enc["config"])
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

  def prompt(self, video: torch.Tensor, video_mask: torch.Tensor, task: str = "",
             cluster_counts: torch.Tensor | None = None):
    """``[instruction][visual tokens]`` embeddings [B, P, E] and mask [B, P], left-padded.

    ``cluster_counts`` [B, T] (run lengths, 0 after): deduplication, for a
    sequence-preserving projector (ignored by others, as in training).
    """
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
    tokens, tokens_mask = out.tokens, out.mask.bool()
    if cluster_counts is not None and self.projector.sequence_preserving:
      tokens, tokens_mask = average_runs(tokens, tokens_mask, cluster_counts)
    tokens = tokens.to(instr.dtype) * self.visual_scale
    embeds = torch.cat([instr, tokens], dim=1)
    mask = torch.cat([instr_mask, tokens_mask], dim=1)
    order = torch.argsort(mask.to(torch.int8), dim=1, stable=True)   # padding first, in order
    embeds = torch.take_along_dim(embeds, order[..., None], dim=1)
    return embeds, torch.take_along_dim(mask, order, dim=1)

  def _lookup_scale(self) -> float:
    """What our embedding lookup multiplies by (Gemma: sqrt(hidden)); HF's layer does not."""
    return 1.0 / self.visual_scale

  @torch.no_grad()
  def generate(self, video: torch.Tensor, video_mask: torch.Tensor, task: str = "", *,
               cluster_counts: torch.Tensor | None = None,
               max_new_tokens: int | None = None, strategy: str = "greedy",
               beam_size: int = 4, length_penalty: float = 1.0,
               early_stopping: bool | str = "heuristic") -> torch.Tensor:
    """Token ids [B, max_new_tokens] with ``pad_id`` after each row's first EOS.

    Beam options as our ``config.decode``: ``early_stopping`` True, 'heuristic'
    (transformers' False) or 'never'.
    """
    n = max_new_tokens or self.max_new_tokens
    embeds, mask = self.prompt(video, video_mask, task, cluster_counts)
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
