"""What trains, and how: param groups from the config, schedules, AdamW.

``config.optim.param_groups`` is a list of ``(regex, schedule_name | None)``
matched against 'a/b/c' parameter paths; the first match wins and every
parameter must match one. ``None`` freezes: frozen parameters are split off
before differentiation, so they get no gradient, no optimizer state and take
no part in the gradient-norm clip. The trainable subtree carries labels (the
schedule names) that route it through ``optax.multi_transform``.

``config.optim.freeze_finetune_updates`` = N > 0 (fairseq's and VSP-LLM's
key) keeps the encoder frozen for the first N updates, whatever the groups
say, then trains the encoder params they label trainable. The encoder's
AdamW state is created at step N (count 0: fresh moments and bias correction,
as fairseq creates a parameter's Adam state at its first gradient), and its
learning rate is its schedule at the global step (fairseq's one global
schedule), so it starts at lr(N), not at the start of a warmup.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import optax

FROZEN = None
ENCODER = "encoder"   # the subtree freeze_finetune_updates holds back


def param_path(path: tuple[str, ...]) -> str:
  return "/".join(str(p) for p in path)


def label_params(params: Any, param_groups) -> dict[tuple[str, ...], str | None]:
  """Flat {path: schedule name or None}. Raises on params no pattern covers."""
  compiled = [(re.compile(pattern), label) for pattern, label in param_groups]
  labels, uncovered = {}, []
  for path in traverse_util.flatten_dict(params):
    name = param_path(path)
    for regex, label in compiled:
      if regex.search(name):
        labels[path] = label
        break
    else:
      uncovered.append(name)
  if uncovered:
    raise ValueError(f"config.optim.param_groups covers no pattern for {len(uncovered)} "
                     f"param(s), e.g. {uncovered[:5]}; end the list with ('.*', None) to freeze "
                     "the rest")
  return labels


def split(params: Any, labels: Mapping[tuple[str, ...], str | None]) -> tuple[dict, dict]:
  """Nested params -> (trainable, frozen) nested dicts holding disjoint leaves."""
  flat = traverse_util.flatten_dict(params)
  trainable = {k: v for k, v in flat.items() if labels[k] is not FROZEN}
  frozen = {k: v for k, v in flat.items() if labels[k] is FROZEN}
  return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def merge(trainable: dict, frozen: dict) -> dict:
  """Inverse of ``split``."""
  flat = traverse_util.flatten_dict(frozen)
  flat.update(traverse_util.flatten_dict(trainable))
  return traverse_util.unflatten_dict(flat)


def unfreeze_step(optim_cfg) -> int:
  """``config.optim.freeze_finetune_updates`` as an int (None or absent -> 0)."""
  n = optim_cfg.get("freeze_finetune_updates") or 0
  if isinstance(n, bool) or not isinstance(n, int) or n < 0:
    raise ValueError(f"config.optim.freeze_finetune_updates={n!r} must be an int >= 0 (the "
                     "updates before the encoder trains; 0 = as config.optim.param_groups say)")
  return n


def phase_labels(labels: Mapping[tuple[str, ...], str | None], optim_cfg, step: int,
                 total_steps: int) -> dict[tuple[str, ...], str | None]:
  """The labels in force at ``step``: before ``freeze_finetune_updates`` the encoder is
  frozen, from then on ``labels`` (the param groups') hold."""
  start = unfreeze_step(optim_cfg)
  if not start:
    return dict(labels)
  late = [k for k, v in labels.items() if k[0] == ENCODER and v is not FROZEN]
  key = f"config.optim.freeze_finetune_updates={start}"
  if not late:
    raise ValueError(f"{key} holds back the encoder, but config.optim.param_groups trains no "
                     "encoder param; label '^encoder/' with a schedule, or set it to 0")
  if start >= total_steps:
    raise ValueError(f"{key} >= config.total_steps={total_steps}: the encoder params "
                     "config.optim.param_groups label trainable would never train")
  if step >= start:
    return dict(labels)
  held = {k: (FROZEN if k[0] == ENCODER else v) for k, v in labels.items()}
  if all(v is FROZEN for v in held.values()):
    raise ValueError(f"{key}: before that step nothing would train (config.optim.param_groups "
                     "trains only encoder params)")
  return held


def make_schedule(cfg, total_steps: int) -> optax.Schedule:
  """warmup_cosine: linear warmup (from peak / warmup_steps, so that the first
  step already learns) then cosine to end_lr_scale * peak.

  tri_stage (VSP-LLM / fairseq): linear warmup from init_lr_scale * peak,
  hold at peak for hold_steps, then exponential decay to final_lr_scale * peak
  at total_steps.
  """
  peak = cfg.peak_lr
  if cfg.kind == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=peak / max(cfg.warmup_steps, 1), peak_value=peak, warmup_steps=cfg.warmup_steps,
        decay_steps=max(total_steps, cfg.warmup_steps + 1), end_value=peak * cfg.end_lr_scale)
  if cfg.kind == "tri_stage":
    decay_steps = max(total_steps - cfg.warmup_steps - cfg.hold_steps, 1)
    warmup = optax.linear_schedule(peak * cfg.init_lr_scale, peak, cfg.warmup_steps)
    hold = optax.constant_schedule(peak)
    decay = optax.exponential_decay(peak, decay_steps, cfg.final_lr_scale)
    return optax.join_schedules([warmup, hold, decay],
                                [cfg.warmup_steps, cfg.warmup_steps + cfg.hold_steps])
  raise ValueError(f"schedule kind {cfg.kind!r} is not known; valid: ['tri_stage', "
                   "'warmup_cosine']")


# Parameter names that multiply an input: the only ones weight decay applies to.
# Biases (also [heads, head_dim] or per-expert ones), norm scales, learned
# queries and embedding tables are left alone, as usual for AdamW.
DECAYED_NAMES = ("kernel", "wi", "wo", "wg")


def _decay_mask(tree):
  """True for matrices named in DECAYED_NAMES (projection and convolution weights)."""
  def decayed(path, x):
    name = getattr(path[-1], "key", str(path[-1]))
    return jnp.ndim(x) >= 2 and name in DECAYED_NAMES
  return jax.tree_util.tree_map_with_path(decayed, tree)


def make_optimizer(optim_cfg, labels: Mapping[tuple[str, ...], str | None],
                   total_steps: int) -> tuple[optax.GradientTransformation, dict]:
  """(optimizer over the trainable subtree, {schedule name: schedule}).

  With ``freeze_finetune_updates`` = N > 0, trainable encoder params (present in
  ``labels`` from step N on: ``phase_labels``) go through their own AdamW,
  keyed '<schedule>@N', whose state starts at step N and whose learning rate is
  ``schedule(count + N)``: the global step's.
  """
  used = sorted({l for l in labels.values() if l is not FROZEN})
  if not used:
    raise ValueError("config.optim.param_groups freezes every parameter: nothing would train")
  missing = [u for u in used if u not in optim_cfg.schedules]
  if missing:
    raise ValueError(f"config.optim.param_groups names schedule(s) {missing} not defined in "
                     f"config.optim.schedules (which has {sorted(optim_cfg.schedules)})")
  schedules = {name: make_schedule(optim_cfg.schedules[name], total_steps) for name in used}
  adamw = lambda lr: optax.adamw(lr, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                                 weight_decay=optim_cfg.weight_decay, mask=_decay_mask)
  start = unfreeze_step(optim_cfg)
  routes, transforms = {}, {}
  for path, name in labels.items():
    if name is FROZEN:
      continue
    route = f"{name}@{start}" if start and path[0] == ENCODER else name
    if route not in transforms:
      lr = schedules[name] if route == name else (
          lambda count, fn=schedules[name]: fn(count + start))
      transforms[route] = adamw(lr)
    routes[path] = route
  trainable_labels = traverse_util.unflatten_dict(routes)
  tx = optax.multi_transform(transforms, trainable_labels)
  if optim_cfg.clip_grad_norm:
    tx = optax.chain(optax.clip_by_global_norm(optim_cfg.clip_grad_norm), tx)
  return tx, schedules
