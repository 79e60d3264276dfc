"""What every torch projector returns, and the constructor every one shares."""
from __future__ import annotations

import inspect
from typing import Any, NamedTuple

import torch
from torch import nn


class ProjectorOutput(NamedTuple):
  """tokens [B, N, E] and mask [B, N] (bool) for the LLM: ours at inference.

  Ours also return aux_losses and embeddings, which only training uses; the
  torch port leaves them out.
  """
  tokens: torch.Tensor
  mask: torch.Tensor


class Projector(nn.Module):
  """Base class. Subclasses take ``(output_dim, input_dim, *, <fields>)``: the
  LLM width, the encoder-feature width and, keyword-only, the same config
  fields with the same defaults as ours; text-aware ones also take
  ``text_dim`` (the instruction-embedding width; default ``output_dim``, the
  LLM's) after ``input_dim``.

  Call: ``module(features [B,T,D], mask [B,T] bool, text=None [B,L,E],
  text_mask=None [B,L]) -> ProjectorOutput``.
  """
  sequence_preserving = False   # one token per frame (as ours)
  text_aware = False

  @classmethod
  def config_fields(cls) -> dict[str, Any]:
    """{field: default} of the keyword-only constructor arguments."""
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
