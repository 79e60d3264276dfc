"""fairseq AV-HuBERT checkpoints (.pt) <-> ``AvHubertEncoder`` variables.

A fairseq checkpoint is a torch pickle ({'model': state dict, 'cfg': omegaconf
config (or 'args'), optimizer state, ...}) read through ``torch_pickle``'s
allow-list. Pretrained checkpoints hold the model at the top level, fine-tuned
ones under 'encoder.w2v_model.' (CTC: 'w2v_encoder.w2v_model.'); the prefix is
detected. ``key_map`` says which fairseq tensor is which of our variables
(``tensor_map``; our paths lead with the collection, 'params' or
'batch_stats'). ``read_config`` builds the encoder's config from the pickle's
header alone (shapes and cfg), without reading a weight.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import logging
import re
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import numpy as np

from vsrllm_jax.formats import safetensors_io, tensor_map, torch_pickle
from vsrllm_jax.formats.tensor_map import CONV, FLATTEN, REVERSE, Rule, lead_ones, linear
from vsrllm_jax.models.encoders.avhubert import AvHubertConfig, init_variables
from vsrllm_jax.models.encoders.video_encoder import PIXEL_MEAN, PIXEL_STD

PREFIXES = ("", "encoder.w2v_model.", "w2v_encoder.w2v_model.")
# fairseq keys the video-only encoder does not use: pretraining heads, the audio
# front end, batch-norm counters. Loading skips them; exporting keeps them.
_UNUSED = re.compile(r"^(mask_emb|label_embs_concat|final_proj\.(weight|bias)|target_glu\..+|"
                     r"feature_extractor_audio\.proj\.(weight|bias))$|\.num_batches_tracked$")


@dataclasses.dataclass
class FairseqExtras:
  """What a checkpoint holds besides the encoder, so that an export round-trips: ``tensors``
  by full key (unused pretraining heads, num_batches_tracked, the rest of a fine-tuned
  model) and ``cfg`` as plain data."""
  prefix: str = ""
  tensors: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  cfg: Any = None


def is_known_unused(key: str) -> bool:
  return bool(_UNUSED.search(key))


def key_map(config: AvHubertConfig) -> list[Rule]:
  """Every tensor of AVHubertModel's video path (keys without prefix), in state-dict order."""
  rules: list[Rule] = []

  def add(key, path, how=tensor_map.SAME, collection="params"):
    rules.append(Rule((collection,) + tuple(path), key, how))

  def batch_norm(key, path):
    add(f"{key}.weight", path + ("scale",))
    add(f"{key}.bias", path + ("bias",))
    add(f"{key}.running_mean", path + ("mean",), collection="batch_stats")
    add(f"{key}.running_var", path + ("var",), collection="batch_stats")

  res = "feature_extractor_video.resnet."
  add(res + "frontend3D.0.weight", ("stem_conv", "kernel"), CONV)
  batch_norm(res + "frontend3D.1", ("stem_bn",))
  add(res + "frontend3D.2.weight", ("stem_act", "negative_slope"))
  in_channels = config.stem_channels
  for stage, (channels, blocks) in enumerate(zip(config.resnet_channels, config.resnet_blocks)):
    for i in range(blocks):
      key, block = f"{res}trunk.layer{stage + 1}.{i}.", f"stage{stage}_block{i}"
      for j in (1, 2):
        add(f"{key}conv{j}.weight", (block, f"conv{j}", "kernel"), CONV)
        batch_norm(f"{key}bn{j}", (block, f"bn{j}"))
        add(f"{key}relu{j}.weight", (block, f"act{j}", "negative_slope"))
      if (stage > 0 and i == 0) or in_channels != channels:   # as BasicBlock decides
        add(key + "downsample.0.weight", (block, "downsample", "kernel"), CONV)
        batch_norm(key + "downsample.1", (block, "downsample_bn"))
      in_channels = channels
  add("feature_extractor_video.proj.weight", ("video_proj", "kernel"), linear())
  add("feature_extractor_video.proj.bias", ("video_proj", "bias"))
  if config.fused_dim != config.hidden_dim:
    add("post_extract_proj.weight", ("post_extract_proj", "kernel"), linear())
    add("post_extract_proj.bias", ("post_extract_proj", "bias"))
  add("layer_norm.weight", ("feature_norm", "scale"))
  add("layer_norm.bias", ("feature_norm", "bias"))
  add("encoder.pos_conv.0.bias", ("pos_conv", "bias"))
  add("encoder.pos_conv.0.weight_g", ("pos_conv", "weight_g"), lead_ones(2))   # [1, 1, K]
  add("encoder.pos_conv.0.weight_v", ("pos_conv", "weight_v"), REVERSE)        # [D, D/g, K]
  key, lay = "encoder.layers.{i}.", ("layers",)
  for fs, ours in (("k_proj", "key"), ("v_proj", "value"), ("q_proj", "query")):
    add(f"{key}self_attn.{fs}.weight", lay + ("self_attn", ours, "kernel"), linear(1))
    add(f"{key}self_attn.{fs}.bias", lay + ("self_attn", ours, "bias"), FLATTEN)
  add(key + "self_attn.out_proj.weight", lay + ("self_attn", "out", "kernel"), linear(2))
  add(key + "self_attn.out_proj.bias", lay + ("self_attn", "out", "bias"))
  for fs, ours, how in (("self_attn_layer_norm", ("self_attn_layer_norm",), None),
                        ("fc1", ("mlp", "wi"), linear()), ("fc2", ("mlp", "wo"), linear())):
    add(f"{key}{fs}.weight", lay + ours + ("scale" if how is None else "kernel",),
        how or tensor_map.SAME)
    add(f"{key}{fs}.bias", lay + ours + ("bias",))
  add(f"{key}final_layer_norm.weight", lay + ("final_layer_norm", "scale"))
  add(f"{key}final_layer_norm.bias", lay + ("final_layer_norm", "bias"))
  add("encoder.layer_norm.weight", ("encoder_norm", "scale"))
  add("encoder.layer_norm.bias", ("encoder_norm", "bias"))
  return rules


def expected_keys(config: AvHubertConfig) -> set[str]:
  return {r.theirs.replace(tensor_map.LAYER, str(i))
          for r in key_map(config) for i in range(config.num_layers if r.stacked else 1)}


def _count(keys, pattern: str, start: int = 0) -> int:
  """How many consecutive indices n >= start make ``pattern.format(n)`` a key."""
  n = start
  while pattern.format(n) in keys:
    n += 1
  return n - start


def config_from_state_dict(tensors, source: str, *, num_heads: int | None = None,
                           layer_norm_first: bool | None = None) -> AvHubertConfig:
  """The shapes of an AVHubertModel state dict (keys without prefix; values with a
  ``shape``: arrays, or ``torch_pickle.TensorInfo`` from a header).

  Heads cannot be read from shapes: ``num_heads`` or hidden_dim // 64 (both
  published sizes); ``layer_norm_first`` None keeps the config's default.
  """
  def shape(key):
    if key not in tensors:
      raise ValueError(f"{source}: key {key!r} is missing; the encoder's shape is read from it")
    return tuple(tensors[key].shape)

  res = "feature_extractor_video.resnet."
  stem = shape(res + "frontend3D.0.weight")                   # [C, 1, kt, kh, kw]
  stages = range(1, _count(tensors, res + "trunk.layer{}.0.conv1.weight", start=1) + 1)
  dim = shape("feature_extractor_video.proj.weight")[0]
  fused = shape("layer_norm.weight")[0]
  pos_v = shape("encoder.pos_conv.0.weight_v")                # [D, D/groups, K]
  num_layers = _count(tensors, "encoder.layers.{}.fc1.weight")
  if not stages or not num_layers:
    raise ValueError(f"{source}: found {len(stages)} ResNet stages and {num_layers} "
                     "Transformer layers; expected keys like '...trunk.layer1.0.conv1.weight' "
                     "and 'encoder.layers.0.fc1.weight'")
  if fused not in (dim, 2 * dim):
    raise ValueError(f"{source}: layer_norm.weight has {fused} entries; expected {2 * dim} "
                     f"(modality_fuse='concat') or {dim} ('add') for encoder width {dim}")
  extra = {} if layer_norm_first is None else {"layer_norm_first": bool(layer_norm_first)}
  return AvHubertConfig(
      stem_channels=stem[0], stem_kernel=stem[2:],
      resnet_channels=[shape(f"{res}trunk.layer{s}.0.conv1.weight")[0] for s in stages],
      resnet_blocks=[_count(tensors, f"{res}trunk.layer{s}.{{}}.conv1.weight") for s in stages],
      hidden_dim=dim, num_layers=num_layers, num_heads=num_heads or max(dim // 64, 1),
      mlp_dim=shape("encoder.layers.0.fc1.weight")[0], conv_pos=pos_v[2],
      conv_pos_groups=dim // pos_v[1], modality_fuse="concat" if fused == 2 * dim else "add",
      **extra)


def detect_prefix(keys, source: str) -> str:
  """'' (pretrained) or the fine-tuned model's prefix in front of the AV-HuBERT keys."""
  marker = "feature_extractor_video.proj.weight"
  found = [p for p in PREFIXES if p + marker in keys]
  if not found:
    near = sorted(k for k in keys if k.endswith(marker))
    raise ValueError(f"{source}: no AV-HuBERT video encoder found: expected key "
                     f"{marker!r} under one of the prefixes {list(PREFIXES)}; "
                     f"found {near or 'none'} (first keys: {sorted(keys)[:5]})")
  return found[0]


def _model_cfg(cfg: Any) -> dict | None:
  """The AV-HuBERT model's fields in a plain cfg: a fine-tuned model's w2v_args first
  (VSP-LLM's own 'model' has an encoder_embed_dim too), then 'model', then flat args."""
  for path in (("model", "w2v_args", "model"), ("model",), ("w2v_args", "model"),
               ("w2v_args",), ()):
    node = cfg
    for part in path:
      node = node.get(part) if isinstance(node, Mapping) else None
    if isinstance(node, Mapping) and "encoder_embed_dim" in node:
      return node
  return None


def _cfg_value(section, key, kind):
  """section[key] if it is a ``kind`` (an int that is not a bool), else None."""
  value = section.get(key) if section else None
  return None if kind is int and isinstance(value, bool) or not isinstance(value, kind) else value


def _config(tensors, cfg, source: str, layer_norm_first: bool | None):
  """(prefix, config) of a checkpoint's tensors (or their infos) and plain cfg."""
  prefix = detect_prefix(tensors, source)
  local = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
  section = _model_cfg(cfg)
  if layer_norm_first is None:
    layer_norm_first = _cfg_value(section, "layer_norm_first", bool)
  config = config_from_state_dict(local, source, layer_norm_first=layer_norm_first,
                                  num_heads=_cfg_value(section, "encoder_attention_heads", int))
  return prefix, local, config


def read_config(path, *, layer_norm_first: bool | None = None) -> AvHubertConfig:
  """The encoder's config from the checkpoint's pickle alone: no weight is read."""
  header = torch_pickle.read_header(path)
  return _config(header["model"], header["cfg"], str(path), layer_norm_first)[2]


def load(path, *, layer_norm_first: bool | None = None, strict: bool = True,
         return_extra: bool = False):
  """(AvHubertConfig, {'params', 'batch_stats'}) of a fairseq AV-HuBERT checkpoint.

  Shapes come from the state dict; heads and ``layer_norm_first`` from the cfg
  (else D // 64 heads and the config's default); the argument overrides the cfg.
  Missing or unexpected encoder keys raise when ``strict``, else are logged and
  missing ones keep a fresh init. ``return_extra`` adds a ``FairseqExtras``,
  what ``save`` needs to write the same file back.
  """
  source = str(path)
  state = torch_pickle.read_checkpoint(path)
  tensors, cfg = state["model"], state["cfg"]
  prefix, local, config = _config(tensors, cfg, source, layer_norm_first)
  expected = expected_keys(config)
  missing = sorted(expected - set(local))
  unexpected = sorted(set(local) - expected - {k for k in local if is_known_unused(k)})
  if missing or unexpected:
    message = (f"{source} does not match an AV-HuBERT video encoder of {config}: "
               f"missing keys {missing}, unexpected keys {unexpected}")
    if strict:
      raise ValueError(message)
    logging.warning("%s (strict=False: missing ones keep a fresh init)", message)
  readable = {k: v for k, v in local.items() if k in expected}
  if missing:   # from a fresh init, in fairseq's layout
    fresh = to_state_dict(config, nn.meta.unbox(init_variables(config)))
    readable.update({k: fresh[k] for k in missing})
  shapes = flax.traverse_util.flatten_dict(nn.meta.unbox(init_variables(config, abstract=True)))
  reader = safetensors_io.InMemory({k: np.asarray(v, np.float32) for k, v in readable.items()})
  variables = tensor_map.read_params(tensor_map.plan(key_map(config), shapes, reader, source),
                                     reader, np.float32)
  variables = {"params": variables.get("params", {}),
               "batch_stats": variables.get("batch_stats", {})}
  if not return_extra:
    return config, variables
  consumed = {prefix + k for k in expected & set(local)}
  kept = {k: v for k, v in tensors.items() if k not in consumed}
  return config, variables, FairseqExtras(prefix=prefix, tensors=kept, cfg=cfg)


def to_state_dict(config: AvHubertConfig, variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """{'params', 'batch_stats'} -> fairseq state dict (keys without prefix), float32."""
  host = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32),
                      nn.meta.unbox(dict(variables)))
  return tensor_map.to_theirs(host, key_map(config), layer_major=True)


def batch_norm_prefixes(config: AvHubertConfig) -> list[str]:
  """fairseq module names of the batch norms (each has a num_batches_tracked)."""
  return [r.theirs[:-len(".running_mean")] for r in key_map(config)
          if r.theirs.endswith(".running_mean")]


def _config_section(c: AvHubertConfig) -> dict[str, Any]:
  return dict(encoder_layers=c.num_layers, encoder_embed_dim=c.hidden_dim,
              encoder_ffn_embed_dim=c.mlp_dim, encoder_attention_heads=c.num_heads,
              conv_pos=c.conv_pos, conv_pos_groups=c.conv_pos_groups,
              layer_norm_first=c.layer_norm_first, modality_fuse=c.modality_fuse)


def _export_cfg(config: AvHubertConfig, cfg: Any) -> dict[str, Any]:
  """The checkpoint's plain cfg with the model section set from ``config`` (or a fresh one)."""
  if isinstance(cfg, Mapping) and _model_cfg(cfg) is not None:
    cfg = copy.deepcopy(dict(cfg))
    _model_cfg(cfg).update(_config_section(config))
    return cfg
  return {"model": {"_name": "av_hubert", **_config_section(config), "label_rate": 25,
                    "resnet_relu_type": "prelu", "sub_encoder_layers": 0, "audio_feat_dim": 104},
          "task": {"_name": "av_hubert_pretraining", "input_modality": "image", "labels": ["km"],
                   "normalize": True, "sample_rate": 25, "label_rate": 25, "image_crop_size": 88,
                   "image_mean": PIXEL_MEAN, "image_std": PIXEL_STD, "stack_order_audio": 4}}


def save(path, config: AvHubertConfig, variables: Mapping[str, Any],
         extra: FairseqExtras | Mapping[str, Any] | None = None) -> None:
  """Writes ``variables`` as a fairseq checkpoint ({'model': state dict, 'cfg': plain dict}).

  AVHubertModel's keys (with ``extra.prefix``) and torch layouts in float32,
  ``num_batches_tracked`` per batch norm, and ``extra``'s tensors under their
  own keys. Without ``extra`` the file holds the video encoder only, which
  fairseq loads with ``strict=False`` (as its fine-tuning does). Atomic write.
  """
  import torch  # pylint: disable=g-import-not-at-top
  if extra is None:
    extra = FairseqExtras()
  elif not isinstance(extra, FairseqExtras):
    extra = FairseqExtras(tensors=dict(extra))
  state_dict = collections.OrderedDict()
  for key, array in to_state_dict(config, variables).items():
    state_dict[extra.prefix + key] = torch.from_numpy(np.require(array, np.float32, "CW"))
  for key in batch_norm_prefixes(config):
    state_dict[f"{extra.prefix}{key}.num_batches_tracked"] = torch.tensor(0, dtype=torch.int64)
  for key, value in extra.tensors.items():
    value = np.asarray(value)
    state_dict[key] = torch.from_numpy(np.require(value, value.dtype, "CW"))
  torch_pickle.write_checkpoint(path, {
      "args": None, "cfg": _export_cfg(config, extra.cfg), "model": state_dict,
      "optimizer_history": [{"criterion_name": "none", "optimizer_name": "none",
                             "lr_scheduler_state": {}, "num_updates": 0}],
      "extra_state": {"train_iterator": {"epoch": 1}}, "task_state": {}})
