"""The convert command on the image path: a CLIP / SigLIP tower exported in the Hugging Face
layout, read back by transformers (strictly) and by our loader (bit-identical), run by the
PyTorch side as ours runs it, and an image-caption run transcribed identically in PyTorch."""
import json
import os
import subprocess
import sys

import flax
import jax
import numpy as np
import pytest
import torch
import transformers

from vsrllm_jax.configs import common
from tests.helpers.numerics import assert_close
from tests.helpers.image_fixtures import perturbed, write_caption_folder
from vsrllm_jax.configs import image_caption
from vsrllm_jax.run import checkpoint, setup as setup_lib, state as state_lib
from vsrllm_jax.run import open as open_lib
from vsrllm_jax import convert, from_torch, sharding
from vsrllm_jax.formats import export_bundle
from vsrllm_jax.training import loop
from vsrllm_jax.run import workdir as workdir_lib
from vsrllm_jax.models import build as build_lib
from vsrllm_jax.data import pipeline
from vsrllm_jax.formats import hf_vision
from vsrllm_jax.models.encoders import vision_tower
from vsrllm_jax.models.vsr_model import VSRModel
from vsrllm_jax.models import encoders
from vsrllm_jax.torch_port import encoders as torch_encoders
from vsrllm_jax.torch_port import model as torch_model

VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
              image_size=16, patch_size=4)
TEXT = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            vocab_size=64, bos_token_id=0, eos_token_id=1, pad_token_id=1)
PREPROCESSOR = {"image_processor_type": "CLIPImageProcessor", "do_normalize": True,
                "image_mean": [0.4, 0.5, 0.6], "image_std": [0.2, 0.3, 0.25],
                "rescale_factor": 1 / 255, "do_center_crop": True}
# (source, feature_layer, drop_cls, post_layernorm, param_dtype): LLaVA's choice, SigLIP's
# default, a two-tower source with the post-layernorm forced on, SigLIP's embeddings alone,
# bfloat16 params (frozen_param_dtype) with float32 ones in the source.
CASES = [("clip_vision", -2, True, None, None), ("siglip_vision", -1, False, None, None),
         ("clip", 1, False, True, None), ("siglip", 0, False, None, None),
         ("siglip_vision", -2, False, None, "bfloat16")]
IDS = [f"{c[0]}_{c[1]}" + (f"_{c[4]}" if c[4] else "") for c in CASES]


def _overrides(case) -> dict:
  _, feature_layer, drop_cls, post, _ = case
  return dict(feature_layer=feature_layer, drop_cls=drop_cls,
              **({} if post is None else dict(post_layernorm=post)))


@pytest.fixture(scope="module")
def towers(tmp_path_factory, torch_single_thread):
  """name -> a saved random tower dir (bare vision models and two-tower models)."""
  del torch_single_thread
  torch.manual_seed(0)
  models = {
      "clip_vision": transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)),
      "siglip_vision": transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION)),
      "clip": transformers.CLIPModel(transformers.CLIPConfig(
          vision_config=VISION, text_config=TEXT, projection_dim=8)),
      "siglip": transformers.SiglipModel(transformers.SiglipConfig(
          vision_config=VISION, text_config=TEXT)),
  }
  out = {}
  for name, model in models.items():
    path = tmp_path_factory.mktemp(name)
    perturbed(model).save_pretrained(path)
    if name == "clip_vision":
      (path / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    out[name] = path
  return out


@pytest.fixture(scope="module")
def exports(towers, tmp_path_factory):
  """case -> (config, params, export dir) for each of CASES."""
  out = {}
  for case in CASES:
    config, params = hf_vision.from_pretrained_vision(
        towers[case[0]], param_dtype=case[4], **_overrides(case))
    path = tmp_path_factory.mktemp("export") / "encoder"
    hf_vision.save_vision_tower(path, config, params, towers[case[0]])
    out[case] = config, params, path
  return out


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_export_loads_strictly_in_transformers(exports, case):
  config, _, path = exports[case]
  model, info = transformers.AutoModel.from_pretrained(path, output_loading_info=True)
  assert type(model).__name__ == {"clip": "CLIPVisionModel", "siglip": "SiglipVisionModel"}[
      config.kind]
  assert not any(info.values()), info
  for cls in (transformers.CLIPVisionModel, transformers.SiglipVisionModel):
    if cls.__name__.lower().startswith(config.kind):
      _, info = cls.from_pretrained(path, output_loading_info=True)
      assert not any(info.values()), info


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_our_loader_reads_the_export_back_bit_identical(exports, case):
  config, params, path = exports[case]
  again_config, again = hf_vision.from_pretrained_vision(path, **_overrides(case))
  assert again_config == config          # shape, pixel statistics, resize mode, feature choice
  got, want = flax.traverse_util.flatten_dict(again), flax.traverse_util.flatten_dict(params)
  assert got and set(got) == set(want)
  for k in want:
    assert got[k].dtype == want[k].dtype, k
    np.testing.assert_array_equal(got[k], want[k], err_msg="/".join(k))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_torch_tower_features_match_ours(exports, case):
  config, params, path = exports[case]
  images = np.random.default_rng(1).integers(0, 256, (2, 1, 16, 16, 3), dtype=np.uint8)
  ours, ours_mask = vision_tower.VisionTower(config).apply({"params": params}, images[:, 0])
  tower = torch_encoders.load("hf_vision_tower", str(path),
                              encoders.kind_of(config).config_to_json(config))
  mask = torch.tensor([[True], [False]])
  with torch.no_grad():
    feats, feats_mask = tower(torch.from_numpy(images), mask)
  err = float(np.abs(feats.numpy() - np.asarray(ours)).max())
  print(f"{case}: torch vs ours max abs error {err:.2e}")
  assert feats.shape == ours.shape == (2, config.num_features, VISION["hidden_size"])
  assert_close(feats.numpy(), ours, rtol=1e-4, atol_frac=1e-5)
  assert feats_mask.tolist() == [[True] * config.num_features, [False] * config.num_features]
  assert np.asarray(ours_mask).all()


def test_export_needs_the_source_directory(exports, towers, tmp_path):
  config, params, _ = exports[CASES[0]]
  with pytest.raises(FileNotFoundError, match="config.json not found"):
    hf_vision.save_vision_tower(tmp_path / "a", config, params, tmp_path / "nowhere")
  with pytest.raises(ValueError, match="do not fit this directory"):   # CLIP params, SigLIP dir
    hf_vision.save_vision_tower(tmp_path / "b", config, params, towers["siglip_vision"])
  with pytest.raises(ValueError, match="params do not match their config"):
    hf_vision.save_vision_tower(tmp_path / "c", config, {"layers": params["layers"]},
                                        towers["clip_vision"])


# ------------------------------------------------------------------- an image-caption run

@pytest.fixture(scope="module")
def run(tmp_path_factory, towers):
  """A tiny image-caption run on the CLIP tower (LLaVA's features), trained a few steps."""
  root = tmp_path_factory.mktemp("captions")
  write_caption_folder(root, size=(20, 24))
  llm = os.path.join(common.EMBEDDED_DIR, "llm")
  c = image_caption.get_config(f"manifest_dir={root},tower={towers['clip_vision']},llm={llm},"
                               "steps=4")
  c.data.data_dir = str(root / "tfds")
  c.data.max_label_tokens = 12
  c.data.max_instruction_tokens = 16
  c.data.worker_count = 0
  c.batch_size = c.eval_batch_size = 8
  c.eval_every = c.checkpoint_every = c.log_every = 2
  c.decode.max_new_tokens = 8
  c.optim.schedules.main.warmup_steps = 1
  c.optim.schedules.main.hold_steps = 1
  workdir = str(root / "run")
  loop.train_and_evaluate(c, workdir)
  return workdir


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("export_run") / "out")
  return out, convert.convert(run, out)


def test_run_export_holds_the_tower_and_transcribes_as_jax_does(run, exported, towers):
  from vsrllm_jax.tools import compare_torch  # pylint: disable=g-import-not-at-top
  out, meta = exported
  assert sorted(os.listdir(out)) == ["encoder", "llm", "projector.safetensors",
                                     export_bundle.CONFIG_FILE]
  assert meta["encoder"]["format"] == "hf_vision_tower" and meta["encoder"]["dir"] == "encoder"
  assert (meta["encoder"]["config"]["feature_layer"], meta["encoder"]["config"]["drop_cls"]) == (
      -2, True)
  assert sorted(os.listdir(os.path.join(out, "encoder"))) == [
      "config.json", "model.safetensors", "preprocessor_config.json"]
  result = compare_torch.compare(run, out, "test", "greedy")
  print("image-caption run, test split:", result)
  assert result["clips"] == 8
  assert result["identical"] == 1.0, open(os.path.join(out, "compare_test_greedy.jsonl")).read()


def test_run_export_gives_our_visual_tokens_from_raw_images(run, exported):
  """The LLM's image inputs themselves (a few training steps leave greedy text image-blind)."""
  out, _ = exported
  trained = open_lib.open_run(run, on_host=True)
  config, tok, model = trained.config, trained.setup.tokenizer, trained.model
  params, model_state = trained.host_weights()
  batch = next(pipeline.eval_batches(config.data, tok, "test", global_batch_size=8,
                                     source=pipeline.data_source(config.data, "test")))
  inputs = {k: batch[k] for k in ("video", "video_mask", "instruction_ids", "instruction_mask")}
  _, ours, ours_mask = model.apply({"params": params, **model_state}, inputs, train=False,
                                   method=VSRModel.project)
  ported, _, _ = torch_model.VsrLlm.from_export(out)
  with torch.no_grad():
    embeds, mask = ported.prompt(torch.from_numpy(np.asarray(batch["video"])),
                                 torch.from_numpy(np.asarray(batch["video_mask"])))
  n = ours.shape[1]
  assert np.asarray(ours_mask).all() and mask[:, -n:].all()
  err = float(np.abs(embeds[:, -n:].numpy() - np.asarray(ours)).max())
  print(f"image-caption run: visual tokens, torch vs ours max abs error {err:.2e}")
  assert_close(embeds[:, -n:].numpy(), ours, rtol=1e-4, atol_frac=1e-5)
  assert np.abs(np.asarray(ours)[0] - np.asarray(ours)[1]).max() > 100 * err   # images matter


def test_run_export_imports_back_bit_identical(run, exported, tmp_path):
  """from_torch on an image run: the tower read from the export's encoder/ directory."""
  out, meta = exported
  new = str(tmp_path / "imported")
  step = from_torch.import_export(out, new)
  assert step == meta["source"]["step"]
  config, _ = setup_lib.resolve_config(workdir_lib.load_config(new))
  assert config.encoder.path == os.path.join(os.path.abspath(out), "encoder")
  params, _ = open_lib.open_run(run, on_host=True).host_weights()
  abstract = state_lib.layout(build_lib.build_model(config), config,
                              sharding.make_mesh((1, 1, 1), jax.devices()[:1])).abstract()
  ckpts = checkpoint.Checkpoints(new, 2)
  state, _ = ckpts.restore(step, abstract)
  ckpts.close()
  got = jax.device_get(state.params)
  assert jax.tree.structure(got) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, got, params)      # JAX -> PyTorch -> JAX


def test_torch_model_does_not_import_jax():
  code = ("import sys, vsrllm_jax.torch_port.model; "
          "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax')); "
          "assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True,
                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
