"""CLIP / SigLIP vision towers loaded from tiny random transformers checkpoints.

Each checkpoint is saved to a tmp dir (a bare vision model, and a two-tower
model whose vision keys sit under ``vision_model.``, one of them sharded with
an index) and loaded by ``from_pretrained_vision``; the chosen layer's
features must match transformers' hidden states (fp32, 1e-4) on random images
that both sides normalise with the same mean/std.
"""
from __future__ import annotations

import json
import shutil

import flax
import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from tests.helpers.numerics import assert_close
from tests.helpers.image_fixtures import perturbed
from vsrllm_jax import sharding
from vsrllm_jax.formats import hf_vision
from vsrllm_jax.models.encoders import vision_tower

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              image_size=16, patch_size=4)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            vocab_size=64, bos_token_id=0, eos_token_id=1, pad_token_id=1)
PREPROCESSOR = {"image_processor_type": "CLIPImageProcessor", "do_normalize": True,
                "image_mean": [0.4, 0.5, 0.6], "image_std": [0.2, 0.3, 0.25],
                "rescale_factor": 1 / 255, "do_center_crop": False}
RULES = sharding.PRESETS["fsdp_tp"]


@pytest.fixture(scope="module")
def images():
  return np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, torch_single_thread, images):
  """name -> (dir, HF vision module, its hidden_states, last_hidden_state, pooler_output)."""
  del torch_single_thread
  torch.manual_seed(0)
  models = {
      "clip_vision": transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)),
      "clip": transformers.CLIPModel(transformers.CLIPConfig(
          vision_config=VISION, text_config=TEXT, projection_dim=16)),
      "siglip_vision": transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION)),
      "siglip": transformers.SiglipModel(transformers.SiglipConfig(
          vision_config=VISION, text_config=TEXT)),
  }
  out = {}
  for name, model in models.items():
    model = perturbed(model)
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path, max_shard_size="20KB" if name == "clip" else "5GB")
    mean, std = vision_tower.PIXEL_STATS[name.split("_")[0]]
    if name == "clip_vision":
      (path / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
      mean, std = PREPROCESSOR["image_mean"], PREPROCESSOR["image_std"]
    pixels = (images / 255.0 - np.asarray(mean)) / np.asarray(std)
    pixels = torch.tensor(pixels.transpose(0, 3, 1, 2), dtype=torch.float32)
    tower = getattr(model, "vision_model", model)
    with torch.no_grad():
      ref = tower(pixel_values=pixels, output_hidden_states=True)
    out[name] = dict(path=path, hidden=[h.numpy() for h in ref.hidden_states],
                     last=ref.last_hidden_state.numpy(), pooled=ref.pooler_output.numpy())
  assert len(list(out["clip"]["path"].glob("model-*.safetensors"))) > 1  # the index path
  return out


def _features(path, images, **overrides):
  config, params = hf_vision.from_pretrained_vision(path, **overrides)
  features, mask = vision_tower.VisionTower(config).apply({"params": params}, images)
  return config, np.asarray(features), np.asarray(mask)


@pytest.mark.parametrize("name,feature_layer,drop_cls", [
    ("clip_vision", -1, False), ("clip_vision", -2, True), ("clip", -1, False),
    ("clip", 1, True), ("siglip_vision", -1, False), ("siglip_vision", -2, False),
    ("siglip", -1, False), ("siglip", 0, False)])
def test_features_match_transformers(checkpoints, images, name, feature_layer, drop_cls):
  ref = checkpoints[name]
  config, features, mask = _features(ref["path"], images, feature_layer=feature_layer,
                                     drop_cls=drop_cls)
  siglip_last = name.startswith("siglip") and feature_layer == -1
  assert config.post_layernorm == siglip_last
  # SigLIP's last_hidden_state is post_layernorm(hidden_states[-1]); CLIP's is hidden_states[-1].
  want = ref["last"] if siglip_last else ref["hidden"][feature_layer]
  if drop_cls:
    want = want[:, 1:]
  assert features.shape == want.shape == (2, config.num_features, 32)
  assert not np.allclose(ref["hidden"][-1], ref["hidden"][-2], atol=1e-2)  # layers do something
  assert_close(features, want, rtol=1e-4, atol_frac=1e-5)
  assert mask.shape == features.shape[:2] and mask.dtype == bool and mask.all()
  assert config.layers_used == feature_layer % (VISION["num_hidden_layers"] + 1)


def test_clip_post_layernorm_gives_the_pooled_class_token(checkpoints, images):
  ref = checkpoints["clip"]
  _, features, _ = _features(ref["path"], images, post_layernorm=True)
  assert_close(features[:, 0], ref["pooled"], rtol=1e-4, atol_frac=1e-5)


def test_preprocessor_config_sets_pixel_statistics(checkpoints, images):
  config = hf_vision.read_config(checkpoints["clip_vision"]["path"])
  assert config.image_mean == tuple(PREPROCESSOR["image_mean"])
  assert config.image_std == tuple(PREPROCESSOR["image_std"])
  assert config.resize_mode == "squash"
  defaults = hf_vision.read_config(checkpoints["clip"]["path"])
  assert (defaults.image_mean, defaults.image_std) == vision_tower.PIXEL_STATS["clip"]
  assert defaults.resize_mode == "center_crop"
  siglip = hf_vision.read_config(checkpoints["siglip"]["path"])
  assert siglip.image_mean == siglip.image_std == (0.5, 0.5, 0.5)
  assert siglip.resize_mode == "squash"


def test_float_images_in_unit_range_match_uint8(checkpoints, images):
  config, params = hf_vision.from_pretrained_vision(checkpoints["siglip"]["path"])
  tower = vision_tower.VisionTower(config)
  a, _ = tower.apply({"params": params}, images)
  b, _ = tower.apply({"params": params}, images.astype(np.float32) / 255.0)
  assert_close(a, b, rtol=1e-5, atol_frac=1e-6)


def test_bfloat16_load_is_close_to_float32(checkpoints, images):
  path = checkpoints["clip_vision"]["path"]
  config, params = hf_vision.from_pretrained_vision(path, dtype="bfloat16",
                                                            param_dtype="bfloat16")
  assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(jax.numpy.bfloat16)}
  features, _ = vision_tower.VisionTower(config).apply({"params": params}, images)
  want = checkpoints["clip_vision"]["hidden"][-1]
  assert features.dtype == jax.numpy.bfloat16
  err = np.abs(np.asarray(features, np.float32) - want).max()
  assert 0 < err < 0.05 * np.abs(want).max(), err


def test_params_carry_logical_axes_and_skip_unused_layers(checkpoints):
  config = hf_vision.read_config(checkpoints["clip"]["path"], feature_layer=-2)
  boxed = hf_vision.param_shapes(config, boxed=True)
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) and len(x.names) == x.value.ndim
                        for x in leaves)
  flat = flax.traverse_util.flatten_dict(nn.meta.unbox(boxed))
  assert flat[("layers", "fc1", "kernel")].shape == (2, 32, 64)   # 2 of the 3 layers
  assert ("post_layernorm", "scale") not in flat
  _, params = hf_vision.from_pretrained_vision(checkpoints["clip"]["path"],
                                                       feature_layer=-2)
  assert params["layers"]["fc1"]["kernel"].shape == (2, 32, 64)


def test_mesh_load_matches_host_load(checkpoints):
  path = checkpoints["clip"]["path"]
  mesh = sharding.make_mesh((1, 4, 2))
  config, host = hf_vision.from_pretrained_vision(path)
  _, placed = hf_vision.from_pretrained_vision(path, mesh=mesh, rules=RULES)
  expected = flax.traverse_util.flatten_dict(sharding.logical_shardings(
      hf_vision.param_shapes(config, boxed=True), mesh, RULES))
  host, placed = (flax.traverse_util.flatten_dict(t) for t in (host, placed))
  assert set(host) == set(placed) == set(expected)
  for key, x in placed.items():
    assert isinstance(x, jax.Array) and x.sharding == expected[key], key
    np.testing.assert_array_equal(np.asarray(x), host[key])
  q = placed[("layers", "self_attn", "query", "kernel")]   # [L, E, H, D]: embed/fsdp, heads/tensor
  assert q.addressable_shards[0].data.shape == (3, 32 // 4, 4 // 2, 8)


def test_bad_directory_and_model_type(tmp_path, checkpoints):
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf_vision.from_pretrained_vision(tmp_path / "nowhere")
  bad = tmp_path / "vit"
  shutil.copytree(checkpoints["clip_vision"]["path"], bad)
  blob = json.loads((bad / "config.json").read_text())
  (bad / "config.json").write_text(json.dumps({**blob, "model_type": "vit"}))
  with pytest.raises(ValueError, match=r"model_type='vit'.*clip_vision_model"):
    hf_vision.from_pretrained_vision(bad)
  (bad / "config.json").write_text(json.dumps({**blob, "hidden_act": "relu"}))
  with pytest.raises(ValueError, match="hidden_act"):
    hf_vision.from_pretrained_vision(bad)
  with pytest.raises(ValueError, match="drop_cls"):
    hf_vision.read_config(checkpoints["siglip"]["path"], drop_cls=True)
  with pytest.raises(ValueError, match="feature_layer"):
    hf_vision.read_config(checkpoints["siglip"]["path"], feature_layer=4)


def test_missing_and_unexpected_vision_keys_are_named(tmp_path, checkpoints):
  src = checkpoints["clip_vision"]["path"]
  tensors = load_file(str(src / "model.safetensors"))
  cases = {
      "missing": ({k: v for k, v in tensors.items() if k != "encoder.layers.1.mlp.fc2.bias"},
                  r"missing keys \['encoder.layers.1.mlp.fc2.bias'\]"),
      "unexpected": ({**tensors, "encoder.layers.0.extra.weight": np.zeros(2, np.float32)},
                     r"unexpected keys \['encoder.layers.0.extra.weight'\]"),
      "shape": ({**tensors, "pre_layrnorm.bias": np.zeros(5, np.float32)},
                r"pre_layrnorm.bias: \(5,\) != expected \(32,\)"),
      "two_towers": ({**tensors, **{"other." + k: v for k, v in tensors.items()}},
                     "exactly one vision tower"),
  }
  for name, (state, message) in cases.items():
    path = tmp_path / name
    path.mkdir()
    shutil.copy(src / "config.json", path / "config.json")
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=message):
      hf_vision.from_pretrained_vision(path)
  # Text-tower keys outside the vision prefix are ignored, tolerated extras inside it too.
  path = tmp_path / "extras"
  path.mkdir()
  shutil.copy(src / "config.json", path / "config.json")
  save_file({**{"vision_model." + k: v for k, v in tensors.items()},
             "vision_model.embeddings.position_ids": np.arange(17, dtype=np.int64)[None],
             "text_model.embeddings.token_embedding.weight": np.zeros((4, 32), np.float32)},
            str(path / "model.safetensors"))
  hf_vision.from_pretrained_vision(path)


def test_wrong_image_size_is_an_error(checkpoints):
  config, params = hf_vision.from_pretrained_vision(checkpoints["siglip"]["path"])
  with pytest.raises(ValueError, match=r"expected \[B, 16, 16, 3\]"):
    vision_tower.VisionTower(config).apply({"params": params}, np.zeros((1, 32, 32, 3), np.uint8))


def test_minimal_hub_config_uses_transformers_defaults():
  config = vision_tower.VisionTowerConfig.from_hf_config(
      {"model_type": "siglip", "vision_config": {"model_type": "siglip_vision_model",
                                                  "patch_size": 14, "image_size": 224}})
  assert (config.kind, config.hidden_size, config.num_hidden_layers, config.patch_size,
          config.hidden_act, config.layer_norm_eps) == ("siglip", 768, 12, 14,
                                                        "gelu_pytorch_tanh", 1e-6)
  assert config.num_features == 256
  clip = vision_tower.VisionTowerConfig.from_hf_config({"model_type": "clip_vision_model"},
                                                       feature_layer=-2, drop_cls=True)
  assert (clip.patch_size, clip.hidden_act, clip.num_features, clip.layers_used) == (
      32, "quick_gelu", 49, 11)
