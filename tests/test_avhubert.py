"""AV-HuBERT video encoder vs a PyTorch re-statement of fairseq's, and the .pt reader/writer.

The reference below follows facebookresearch/av_hubert (avhubert/hubert.py
``AVHubertModel.extract_finetune`` with video only, avhubert/resnet.py) and
fairseq's wav2vec2 ``TransformerEncoder`` / ``TransformerSentenceEncoderLayer``
and ``MultiheadAttention``, module for module, so that its ``state_dict()``
has the checkpoint's keys.
"""
import argparse
import builtins
import collections
import logging
import math
import os
import pickle
import subprocess
import sys
import types
import typing

import jax
import numpy as np
import pytest
import torch
from torch import nn

from tests.helpers.numerics import assert_close
from vsrllm_jax.models.encoders import avhubert
from vsrllm_jax.models.encoders.avhubert import AvHubertConfig, AvHubertEncoder
from vsrllm_jax.formats.fairseq_avhubert import load as load_avhubert, save as save_avhubert
from vsrllm_jax.formats.torch_pickle import UnsafeCheckpointError
from vsrllm_jax.models.encoders.video_encoder import PIXEL_MEAN, PIXEL_STD

pytestmark = pytest.mark.filterwarnings("ignore:.*weight_norm.*is deprecated:FutureWarning")

TINY = dict(stem_channels=8, resnet_channels=(8, 16, 16, 32), resnet_blocks=(2, 1, 1, 2),
            hidden_dim=32, num_layers=2, num_heads=4, mlp_dim=64, conv_pos_groups=4)
# Post-LN with an even positional kernel (SamePad drops a step), pre-LN with an odd one.
CASES = {"post_ln": dict(layer_norm_first=False, conv_pos=8),
         "pre_ln": dict(layer_norm_first=True, conv_pos=7),
         "add": dict(layer_norm_first=True, conv_pos=8, modality_fuse="add")}
LENGTHS = (6, 4)
SIZE = 20   # stem 10 -> pool 5 -> stages 5, 3, 2, 1


# ----------------------------------------------------------------- torch reference (fairseq)

class RefBasicBlock(nn.Module):
  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.relu1 = nn.PReLU(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.relu2 = nn.PReLU(planes)
    self.downsample = downsample

  def forward(self, x):
    out = self.relu1(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    residual = x if self.downsample is None else self.downsample(x)
    return self.relu2(out + residual)


class RefTrunk(nn.Module):
  """ResNet(BasicBlock, blocks, relu_type='prelu') with its inplanes = the stem's width."""

  def __init__(self, inplanes, channels, blocks):
    super().__init__()
    for s, (planes, n) in enumerate(zip(channels, blocks)):
      stride = 1 if s == 0 else 2
      down = None
      if stride != 1 or inplanes != planes:
        down = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                             nn.BatchNorm2d(planes))
      layer = [RefBasicBlock(inplanes, planes, stride, down)]
      layer += [RefBasicBlock(planes, planes) for _ in range(1, n)]
      setattr(self, f"layer{s + 1}", nn.Sequential(*layer))
      inplanes = planes
    self.num_stages = len(channels)
    self.avgpool = nn.AdaptiveAvgPool2d(1)

  def forward(self, x):
    for s in range(self.num_stages):
      x = getattr(self, f"layer{s + 1}")(x)
    return self.avgpool(x).flatten(1)


class RefResEncoder(nn.Module):
  def __init__(self, c):
    super().__init__()
    kt, kh, kw = c.stem_kernel
    self.frontend3D = nn.Sequential(
        nn.Conv3d(1, c.stem_channels, (kt, kh, kw), (1, 2, 2), (kt // 2, kh // 2, kw // 2),
                  bias=False),
        nn.BatchNorm3d(c.stem_channels), nn.PReLU(c.stem_channels),
        nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)))
    self.trunk = RefTrunk(c.stem_channels, c.resnet_channels, c.resnet_blocks)

  def forward(self, x):                                     # [B, 1, T, H, W] -> [B, C, T]
    b = x.shape[0]
    x = self.frontend3D(x)
    t = x.shape[2]
    x = x.transpose(1, 2).reshape(b * t, x.shape[1], x.shape[3], x.shape[4])
    return self.trunk(x).view(b, t, -1).transpose(1, 2)


class RefSubModel(nn.Module):
  def __init__(self, resnet, input_dim, dim):
    super().__init__()
    self.resnet = resnet
    self.proj = nn.Linear(input_dim, dim)

  def forward(self, x):
    if self.resnet is not None:
      x = self.resnet(x)
    return self.proj(x.transpose(1, 2)).transpose(1, 2)


class RefAttention(nn.Module):
  def __init__(self, dim, heads):
    super().__init__()
    self.heads, self.scaling = heads, (dim // heads) ** -0.5
    self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
    self.q_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)

  def forward(self, x, key_padding_mask):                  # x [T, B, D]
    t, b, d = x.shape
    split = lambda y: y.reshape(t, b * self.heads, d // self.heads).transpose(0, 1)
    q, k, v = split(self.q_proj(x) * self.scaling), split(self.k_proj(x)), split(self.v_proj(x))
    w = torch.bmm(q, k.transpose(1, 2)).view(b, self.heads, t, t)
    w = w.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    w = torch.softmax(w.view(b * self.heads, t, t), dim=-1)
    out = torch.bmm(w, v).transpose(0, 1).reshape(t, b, d)
    return self.out_proj(out)


class RefLayer(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.layer_norm_first = c.layer_norm_first
    self.self_attn = RefAttention(c.hidden_dim, c.num_heads)
    self.self_attn_layer_norm = nn.LayerNorm(c.hidden_dim)
    self.fc1 = nn.Linear(c.hidden_dim, c.mlp_dim)
    self.fc2 = nn.Linear(c.mlp_dim, c.hidden_dim)
    self.final_layer_norm = nn.LayerNorm(c.hidden_dim)

  def forward(self, x, pad):
    ffn = lambda y: self.fc2(nn.functional.gelu(self.fc1(y)))
    if self.layer_norm_first:
      x = x + self.self_attn(self.self_attn_layer_norm(x), pad)
      return x + ffn(self.final_layer_norm(x))
    x = self.self_attn_layer_norm(x + self.self_attn(x, pad))
    return self.final_layer_norm(x + ffn(x))


class SamePad(nn.Module):
  def __init__(self, kernel_size):
    super().__init__()
    self.remove = 1 if kernel_size % 2 == 0 else 0

  def forward(self, x):
    return x[:, :, :-self.remove] if self.remove else x


class RefTransformerEncoder(nn.Module):
  def __init__(self, c):
    super().__init__()
    conv = nn.Conv1d(c.hidden_dim, c.hidden_dim, c.conv_pos, padding=c.conv_pos // 2,
                     groups=c.conv_pos_groups)
    conv = nn.utils.weight_norm(conv, name="weight", dim=2)
    self.pos_conv = nn.Sequential(conv, SamePad(c.conv_pos), nn.GELU())
    self.layers = nn.ModuleList([RefLayer(c) for _ in range(c.num_layers)])
    self.layer_norm = nn.LayerNorm(c.hidden_dim)
    self.layer_norm_first = c.layer_norm_first

  def forward(self, x, pad):                               # x [B, T, D], pad [B, T]
    x = x.masked_fill(pad[..., None], 0.0)
    x = x + self.pos_conv(x.transpose(1, 2)).transpose(1, 2)
    if not self.layer_norm_first:
      x = self.layer_norm(x)
    x = x.transpose(0, 1)
    for layer in self.layers:
      x = layer(x, pad)
    x = x.transpose(0, 1)
    return self.layer_norm(x) if self.layer_norm_first else x


class RefAvHubert(nn.Module):
  """AVHubertModel (pretraining layout); ``forward`` is extract_finetune on video only."""

  def __init__(self, c, audio_feat_dim=12, final_dim=16, num_classes=20):
    super().__init__()
    self.dim, self.fuse = c.hidden_dim, c.modality_fuse
    embed = 2 * c.hidden_dim if c.modality_fuse == "concat" else c.hidden_dim
    self.feature_extractor_audio = RefSubModel(None, audio_feat_dim, c.hidden_dim)
    self.feature_extractor_video = RefSubModel(RefResEncoder(c), c.resnet_channels[-1],
                                               c.hidden_dim)
    self.post_extract_proj = nn.Linear(embed, c.hidden_dim) if embed != c.hidden_dim else None
    self.mask_emb = nn.Parameter(torch.rand(audio_feat_dim))
    self.encoder = RefTransformerEncoder(c)
    self.layer_norm = nn.LayerNorm(embed)
    self.final_proj = nn.Linear(c.hidden_dim, final_dim)
    self.label_embs_concat = nn.Parameter(torch.rand(num_classes, final_dim))

  def forward(self, video, padding_mask):                  # [B, 1, T, H, W], [B, T] True = pad
    video_feats = self.feature_extractor_video(video)
    audio_feats = video_feats.new_zeros(video_feats.shape[0], self.dim, video_feats.shape[-1])
    if self.fuse == "concat":
      feats = torch.cat([audio_feats, video_feats], dim=1)
    else:
      feats = audio_feats + video_feats
    feats = self.layer_norm(feats.transpose(1, 2))
    if self.post_extract_proj is not None:
      feats = self.post_extract_proj(feats)
    return self.encoder(feats, padding_mask)


def make_reference(config, seed):
  torch.manual_seed(seed)
  model = RefAvHubert(config)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
        m.running_mean.normal_(0, 0.2)
        m.running_var.uniform_(0.5, 2.0)
        m.weight.normal_(1.0, 0.2)
        m.bias.normal_(0, 0.1)
        m.num_batches_tracked.fill_(123)
      elif isinstance(m, nn.PReLU):
        m.weight.uniform_(0.05, 0.5)
      elif isinstance(m, nn.LayerNorm):
        m.weight.normal_(1.0, 0.1)
        m.bias.normal_(0, 0.1)
    model.encoder.pos_conv[0].weight_g.uniform_(2.0, 4.0)
  return model.eval()


# ----------------------------------------------------------------- fixtures

def _config(case):
  return AvHubertConfig(**TINY, **CASES[case])


def _cfg_blob(config):
  return {"model": {"_name": "av_hubert", "encoder_embed_dim": config.hidden_dim,
                    "encoder_attention_heads": config.num_heads,
                    "layer_norm_first": config.layer_norm_first},
          "task": {"_name": "av_hubert_pretraining"}}


def _batch():
  rng = np.random.default_rng(0)
  video = rng.integers(0, 256, (len(LENGTHS), max(LENGTHS), SIZE, SIZE, 1), dtype=np.uint8)
  mask = np.arange(max(LENGTHS))[None] < np.array(LENGTHS)[:, None]
  return video, mask


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, torch_single_thread):
  """Per case: reference outputs and .pt files (pretrained and fine-tuned layouts)."""
  del torch_single_thread
  root = tmp_path_factory.mktemp("avhubert")
  video, mask = _batch()
  out = {}
  for i, case in enumerate(CASES):
    config = _config(case)
    ref = make_reference(config, seed=i)
    x = (torch.from_numpy(video).float() / 255.0 - PIXEL_MEAN) / PIXEL_STD
    x = x.masked_fill(~torch.from_numpy(mask)[:, :, None, None, None], 0.0)
    with torch.no_grad():
      expected = ref(x.permute(0, 4, 1, 2, 3), torch.from_numpy(~mask)).numpy()
    sd = ref.state_dict()
    files = {"pretrained": root / f"{case}_pretrained.pt"}
    torch.save({"model": sd, "cfg": _cfg_blob(config), "optimizer_history": []},
               files["pretrained"])
    for prefix in ("encoder.w2v_model.", "w2v_encoder.w2v_model."):
      files[prefix] = root / f"{case}_{prefix.split('.')[0]}.pt"
      tuned = {prefix + k: v for k, v in sd.items() if not k.startswith(("final_proj", "label"))}
      tuned["decoder.embed_tokens.weight"] = torch.randn(5, 3)
      # VSP-LLM's own model cfg has an encoder_embed_dim too: w2v_args must win.
      cfg = {"model": {"_name": "vsp_llm", "encoder_embed_dim": 1024,
                       "layer_norm_first": not config.layer_norm_first,
                       "w2v_args": _cfg_blob(config)}}
      torch.save({"model": tuned, "cfg": cfg}, files[prefix])
    out[case] = dict(config=config, ref=ref, expected=expected, files=files)
  return out


def _flat(variables):
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(variables)}


# ----------------------------------------------------------------- tests

@pytest.mark.parametrize("case", list(CASES))
def test_matches_fairseq_reference_and_ignores_padding(checkpoints, case):
  ck = checkpoints[case]
  config, variables = load_avhubert(ck["files"]["pretrained"])
  assert config == ck["config"]
  video, mask = _batch()
  run = jax.jit(AvHubertEncoder(config).apply)
  got = np.asarray(run(variables, video, mask))
  assert np.all(got[~mask] == 0.0)
  assert_close(got[mask], ck["expected"][mask], rtol=1e-4, atol_frac=1e-5)
  # The short clip alone, without padding, gives the same features.
  n = LENGTHS[1]
  alone = np.asarray(run(variables, video[1:, :n], mask[1:, :n]))
  assert_close(alone[0], got[1, :n], rtol=1e-5, atol_frac=1e-6)
  # Whatever the padded frames hold, real frames do not change.
  noisy = np.where(mask[:, :, None, None, None], video, 255 - video)
  assert_close(np.asarray(run(variables, noisy, mask))[mask], got[mask], rtol=1e-5,
               atol_frac=1e-6)


@pytest.mark.parametrize("prefix", ["encoder.w2v_model.", "w2v_encoder.w2v_model."])
def test_fine_tuned_layout_is_detected(checkpoints, prefix):
  ck = checkpoints["post_ln"]
  config, variables = load_avhubert(ck["files"][prefix])     # layer_norm_first from w2v_args
  assert config == ck["config"]
  _, pretrained = load_avhubert(ck["files"]["pretrained"])
  a, b = _flat(variables), _flat(pretrained)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  forced, _ = load_avhubert(ck["files"][prefix], layer_norm_first=True)
  assert forced.layer_norm_first and not config.layer_norm_first


@pytest.mark.parametrize("layout", ["pretrained", "encoder.w2v_model."])
def test_round_trip_is_exact(checkpoints, tmp_path, layout):
  ck = checkpoints["pre_ln"]
  source = ck["files"][layout]
  config, variables, extra = load_avhubert(source, return_extra=True)
  save_avhubert(tmp_path / "out.pt", config, variables, extra)
  config2, variables2, extra2 = load_avhubert(tmp_path / "out.pt", return_extra=True)
  assert config2 == config and extra2.prefix == extra.prefix
  a, b = _flat(variables), _flat(variables2)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  original = torch.load(source, weights_only=True)["model"]
  written = torch.load(tmp_path / "out.pt", weights_only=True)       # plain data only
  assert set(written["model"]) == set(original)
  assert all(torch.equal(written["model"][k], original[k]) for k in original)
  if layout == "pretrained":   # the state dict AVHubertModel itself loads, strictly
    ck["ref"].load_state_dict(written["model"], strict=True)


def test_export_without_extras_is_the_video_encoder(checkpoints, tmp_path):
  ck = checkpoints["post_ln"]
  config, variables = load_avhubert(ck["files"]["pretrained"])
  save_avhubert(tmp_path / "bare.pt", config, variables)
  sd = torch.load(tmp_path / "bare.pt", weights_only=True)["model"]
  result = make_reference(config, seed=9).load_state_dict(sd, strict=False)
  assert not result.unexpected_keys
  assert sorted(result.missing_keys) == sorted(
      ["mask_emb", "label_embs_concat", "final_proj.weight", "final_proj.bias",
       "feature_extractor_audio.proj.weight", "feature_extractor_audio.proj.bias"])
  assert load_avhubert(tmp_path / "bare.pt")[0] == config


class _Evil:
  def __init__(self, call, arg):
    self.call, self.arg = call, arg

  def __reduce__(self):
    return self.call, (self.arg,)


@pytest.mark.parametrize("how", ["os.system", "builtins.eval", "subprocess.call", "raw_pickle"])
def test_refuses_code_in_the_pickle(tmp_path, how):
  marker = tmp_path / "pwned"
  command = f"touch {marker}"
  payload = {"os.system": _Evil(os.system, command),
             "builtins.eval": _Evil(builtins.eval, f"__import__('os').system({command!r})"),
             "subprocess.call": _Evil(subprocess.call, ["touch", str(marker)]),
             "raw_pickle": _Evil(os.system, command)}[how]
  path = tmp_path / "evil.pt"
  if how == "raw_pickle":           # not a torch zip: the legacy loader's path
    path.write_bytes(pickle.dumps({"model": {}, "cfg": payload}, protocol=2))
  else:
    torch.save({"model": {}, "cfg": payload}, path)
  with pytest.raises(UnsafeCheckpointError) as err:
    load_avhubert(path)
  name = {"os.system": os.system.__module__ + ".system", "raw_pickle": "system",
          "builtins.eval": "builtins.eval", "subprocess.call": "subprocess.call"}[how]
  assert str(path) in str(err.value) and name in str(err.value)
  assert not marker.exists()


def test_missing_and_unexpected_keys_are_named(tmp_path, caplog, torch_single_thread):
  del torch_single_thread
  # One stage, one layer: strict=False initialises the missing tensor (a jitted init).
  config = AvHubertConfig(stem_channels=4, resnet_channels=(8,), resnet_blocks=(1,),
                          hidden_dim=16, num_layers=2, num_heads=2, mlp_dim=16, conv_pos=4,
                          conv_pos_groups=2)
  ref = make_reference(config, seed=3)
  sd = dict(ref.state_dict())
  del sd["encoder.layers.1.fc2.bias"]
  sd["encoder.layers.0.adapter.weight"] = torch.zeros(3)
  path = tmp_path / "odd.pt"
  torch.save({"model": sd, "cfg": _cfg_blob(config)}, path)
  with pytest.raises(ValueError) as err:
    load_avhubert(path)
  assert "encoder.layers.1.fc2.bias" in str(err.value)
  assert "encoder.layers.0.adapter.weight" in str(err.value) and str(path) in str(err.value)
  with caplog.at_level(logging.WARNING):
    loaded, variables = load_avhubert(path, strict=False)
  assert loaded == config
  assert "encoder.layers.1.fc2.bias" in caplog.text and "adapter" in caplog.text
  fc2_bias = variables["params"]["layers"]["mlp"]["wo"]["bias"]
  np.testing.assert_array_equal(fc2_bias[0], ref.encoder.layers[0].fc2.bias.detach())
  np.testing.assert_array_equal(fc2_bias[1], np.zeros(config.hidden_dim))   # a fresh bias


def _fake_omegaconf(monkeypatch):
  """Stand-ins pickled as omegaconf's DictConfig / nodes are (objects whose state is __dict__)."""
  classes = {}
  for package in ("omegaconf", "fairseq", "fairseq.dataclass"):
    monkeypatch.setitem(sys.modules, package, sys.modules.get(package) or
                        types.ModuleType(package))
  for module, name in (("omegaconf.dictconfig", "DictConfig"), ("omegaconf.nodes", "AnyNode"),
                       ("omegaconf.nodes", "BooleanNode"), ("omegaconf.base", "Metadata"),
                       ("fairseq.dataclass.constants", "ChoiceEnum")):
    mod = sys.modules.get(module) or types.ModuleType(module)
    monkeypatch.setitem(sys.modules, module, mod)
    cls = type(name, (), {"__module__": module})
    if name == "ChoiceEnum":
      cls.__init__ = lambda self, value: setattr(self, "value", value)
      cls.__reduce__ = lambda self: (type(self), (self.value,))
    setattr(mod, name, cls)
    classes[name] = cls

  def metadata():   # types, generics and a defaultdict, as omegaconf's Metadata holds
    meta = classes["Metadata"]()
    meta.__dict__.update(ref_type=typing.Tuple[float, ...], object_type=dict, key_type=str,
                         element_type=typing.Optional[str], flags={},
                         resolver_cache=collections.defaultdict(dict))
    return meta

  def build(value, parent):
    if isinstance(value, dict):
      node = classes["DictConfig"]()
      node.__dict__.update(_metadata=metadata(), _parent=parent, _content={})
      node._content.update({k: build(v, node) for k, v in value.items()})
      return node
    node = classes["BooleanNode" if isinstance(value, bool) else "AnyNode"]()
    node.__dict__.update(_metadata=metadata(), _parent=parent, _val=value)
    return node
  return build, classes["ChoiceEnum"]


def test_reads_omegaconf_and_namespace_configs(checkpoints, tmp_path, monkeypatch):
  ck = checkpoints["pre_ln"]
  sd = ck["ref"].state_dict()
  build, choice = _fake_omegaconf(monkeypatch)
  cfg = build({"model": {"_name": "av_hubert", "encoder_embed_dim": 32,
                         "encoder_attention_heads": 4, "layer_norm_first": False,
                         "extractor_mode": choice("default")}, "task": {"labels": ["km"]}}, None)
  extra_state = {"best": np.float64(3.5), "rng": np.arange(3), "raw": b"\x00\xff"}
  torch.save({"model": sd, "cfg": cfg, "extra_state": extra_state}, tmp_path / "omega.pt")
  args = argparse.Namespace(encoder_embed_dim=32, encoder_attention_heads=4,
                            layer_norm_first=True)
  torch.save({"model": sd, "args": args, "cfg": None}, tmp_path / "args.pt")
  monkeypatch.undo()                       # the loader never imports these modules
  config, _, extra = load_avhubert(tmp_path / "omega.pt", return_extra=True)
  assert not config.layer_norm_first and config.num_heads == 4
  assert extra.cfg["model"]["extractor_mode"] == "default"
  assert extra.cfg["task"] == {"labels": ["km"]}
  config, _ = load_avhubert(tmp_path / "args.pt")
  assert config.layer_norm_first and config.num_heads == 4


@pytest.mark.parametrize("size,published", [("base", 103e6), ("large", 325e6)])
def test_presets_have_the_published_sizes(size, published):
  """Parameter counts of the video-only encoder for both presets.

  Compared (1) exactly with the reference AVHubertModel built at full size on
  torch's meta device, less what video-only inference does not use
  (feature_extractor_audio, mask_emb, final_proj, label_embs_concat), and
  (2) with the AV-HuBERT paper's totals (Shi et al., ICLR 2022: BASE 103M,
  LARGE 325M parameters, which include those small heads): within 1%.
  """
  config = getattr(AvHubertConfig, size)()
  count = avhubert.params_count(config)
  with torch.device("meta"):
    ref = RefAvHubert(config)
  unused = ("feature_extractor_audio.", "mask_emb", "final_proj.", "label_embs_concat")
  expected = sum(p.numel() for k, p in ref.named_parameters() if not k.startswith(unused))
  assert count == expected
  assert abs(count - published) / published < 0.01
  assert math.isclose(count / 1e6, round(published / 1e6), abs_tol=0.5)
