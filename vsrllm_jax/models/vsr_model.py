"""The composed model: encoder -> projector -> LLM (frozen or not as
``config.optim.param_groups`` say: the train step, not the model, stops gradients).

The LLM reads ``[instruction][visual tokens][label]``. Each segment may be
padded inside (mask False); attention masks and position ids are built from
the three segment masks, so padding never shifts positions or leaks
attention. In training, logits are computed only at the positions that
predict label tokens.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vsrllm_jax.models import ctc, deduplication, encoders, projectors
from vsrllm_jax.models.llm import LlamaModel, LlmConfig
from vsrllm_jax.models.projectors.base import ProjectorOutput
from vsrllm_jax.sharding import constrain


def previous_real_index(mask: jax.Array) -> jax.Array:
  """For each position i, the largest real index j < i (0 if none). mask [B, S]."""
  idx = jnp.arange(mask.shape[1])
  last_real = jax.lax.cummax(jnp.where(mask, idx[None], -1), axis=1)  # [B, S], <= i
  prev = jnp.pad(last_real[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
  return jnp.maximum(prev, 0)


def pack_right(mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Moves real positions to the front of each row, in order: (order, slot).

  ``order`` [B, S]: packed slot j holds original position order[j];
  ``slot`` [B, S]: where a real original position lands. Attention among
  real tokens is unchanged (positions count real tokens only), and padding is
  all at the end, which fused attention handles as sequence lengths.
  """
  order = jnp.argsort(~mask, axis=1, stable=True)
  slot = jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)
  return order, slot


def check_deduplication(projector: str) -> None:
  """Deduplication averages runs of frames: only a projector with one token per frame
  (``sequence_preserving``) has frames to average."""
  if not projectors.get_class(projector).sequence_preserving:
    keep = sorted(n for n in projectors.names() if projectors.get_class(n).sequence_preserving)
    raise ValueError(f"config.data.use_cluster_counts=True (VSP-LLM deduplication) needs a "
                     f"projector with one token per frame ({keep}); projector {projector!r} "
                     "is not. Set config.data.use_cluster_counts=False or change "
                     "config.projector.name")


class VSRModel(nn.Module):
  """batch -> dict(logits [B, Ll, V], projector ProjectorOutput, aux_losses {name: scalar}).

  ``aux_losses``: the projector's own losses, its label losses
  (``Projector.label_losses``) and CTC's, each needing a weight in
  ``config.loss_weights``.
  """
  encoder_config: encoders.EncoderConfig
  projector_config: Any          # mapping of projector fields incl. 'name'
  llm_config: LlmConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  ctc_config: Any = None         # mapping {enabled, source} (config.ctc); None = no CTC head

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.encoder = encoders.build(self.encoder_config, **kw)
    self.projector = projectors.build(self.projector_config["name"], self.projector_config,
                                      output_dim=self.llm_config.hidden_dim, **kw)
    self.llm = LlamaModel(self.llm_config)
    enabled, source = ctc.check_config(self.ctc_config)
    if enabled and source == "projector" and not type(self.projector).sequence_preserving:
      raise ValueError(f"config.ctc.source='projector' needs a sequence-preserving projector "
                       f"(one token per frame); {self.projector_config['name']!r} is not. Use "
                       "config.ctc.source='encoder' or a projector such as 'mlp'")
    self.ctc_head = ctc.CtcHead(**kw) if enabled else None

  def encode(self, batch) -> tuple[jax.Array, jax.Array]:
    """Visual features [B, T, D] and their mask; cached features are constants.

    The encoder's output carries its gradient: a trainable encoder (param groups,
    raw video) gets its true gradient, a frozen one enters the train step through
    ``stop_gradient`` and XLA computes no backward pass for it. The encoder runs
    as in evaluation even when it trains: batch norm normalises with its running
    statistics (``model_state['batch_stats']``, which the train step never
    updates; its scale and bias are params and train), and AV-HuBERT's layerdrop,
    dropout and masking are not modelled, so the gradient is that of the features
    inference computes. (fairseq's fine-tuning runs it in train mode: batch
    statistics, running averages updated, layerdrop.)
    """
    if "features" in batch:
      return jax.lax.stop_gradient(batch["features"]), batch["features_mask"].astype(bool)
    feats = self.encoder(batch["video"], batch["video_mask"])
    mask = batch["video_mask"].astype(bool)
    if isinstance(feats, tuple):   # an image tower: its own tokens and mask
      feats, mask = feats
    return feats, mask

  def embed_ids(self, ids):
    """LLM embedding table lookup (trains if its param group does). ids [B, L] -> [B, L, E]."""
    return self.llm.embed(ids)

  def project(self, batch, *, train: bool) -> tuple[ProjectorOutput, jax.Array, jax.Array]:
    """Runs encoder and projector. Returns (output, visual tokens, visual mask).

    Only the instruction (never the label) reaches the projector.
    """
    feats, feats_mask = self.encode(batch)
    instr = self.embed_ids(batch["instruction_ids"])
    out = self.projector(feats, feats_mask, text=instr,
                         text_mask=batch["instruction_mask"].astype(bool), train=train)
    tokens, mask = constrain(out.tokens, ("act_batch", "act_length", "act_embed")), out.mask
    if "cluster_counts" in batch:
      check_deduplication(self.projector_config["name"])
      tokens, mask = deduplication.average_runs(tokens, mask, batch["cluster_counts"])
    self.sow("intermediates", "projector_tokens", tokens)
    if self.ctc_head is not None:
      out = self._add_ctc(batch, out, (feats, feats_mask), (tokens, mask), train=train)
    return out, tokens, mask

  def _add_ctc(self, batch, out: ProjectorOutput, encoder, projected, *, train: bool):
    """Applies the CTC head (sown as ctc_logits/ctc_mask); adds aux loss 'ctc' given labels."""
    _, source = ctc.check_config(self.ctc_config)
    x, x_mask = encoder if source == "encoder" else projected
    logits = self.ctc_head(x)                                       # [B, T, VOCAB_SIZE]
    self.sow("intermediates", "ctc_logits", logits)
    self.sow("intermediates", "ctc_mask", x_mask)
    if "ctc_labels" not in batch:
      if train:
        raise ValueError("config.ctc.enabled needs 'ctc_labels'/'ctc_label_mask' in the batch: "
                         "set config.data.ctc_max_chars > 0 (vsrllm_jax/data/pipeline.py)")
      return out
    loss = ctc.ctc_loss(logits, x_mask, batch["ctc_labels"], batch["ctc_label_mask"],
                        batch.get("example_mask"))
    return out.replace(aux_losses={**out.aux_losses, "ctc": loss})

  def prompt(self, batch, *, train: bool = False):
    """[instruction][visual tokens] embeddings [B, P, E], mask [B, P], projector output."""
    out, tokens, mask = self.project(batch, train=train)
    instr = self.embed_ids(batch["instruction_ids"])
    embeds = jnp.concatenate([instr, tokens.astype(instr.dtype)], axis=1)
    prompt_mask = jnp.concatenate([batch["instruction_mask"].astype(bool), mask], axis=1)
    return embeds, prompt_mask, out

  def __call__(self, batch, *, train: bool = False):
    embeds, prompt_mask, out = self.prompt(batch, train=train)
    label_mask = batch["label_mask"].astype(bool)
    label = self.embed_ids(batch["label_ids"])
    embeds = jnp.concatenate([embeds, label], axis=1)                 # [B, S, E]
    mask = jnp.concatenate([prompt_mask, label_mask], axis=1)         # [B, S]
    prompt_len = prompt_mask.shape[1]
    # Label token j is predicted by the last real position before it.
    logit_positions = previous_real_index(mask)[:, prompt_len:]       # [B, Ll]
    packed = self.llm_config.attention_impl == "cudnn"
    if packed:   # padding inside the segments -> all at the end (fused attention's form)
      order, slot = pack_right(mask)
      embeds = jnp.take_along_axis(embeds, order[..., None], axis=1)
      mask = jnp.take_along_axis(mask, order, axis=1)
      logit_positions = jnp.take_along_axis(slot, logit_positions, axis=1)
    logits = self.llm(inputs_embeds=embeds, attention_mask=mask, logit_positions=logit_positions,
                      right_padded=packed, train=train)               # [B, Ll, V]
    counted = label_mask
    if "example_mask" in batch:   # filler rows of an eval batch count in no loss
      counted = counted & batch["example_mask"][:, None].astype(bool)
    aux = {**out.aux_losses, **self.projector.label_losses(out, label, counted)}
    return dict(logits=logits, projector=out, aux_losses=aux)
