"""PyTorch ports of the video encoders (vsrllm_jax/torch_port) vs our JAX encoders.

AV-HuBERT: a tiny random fairseq-layout checkpoint (built with the fairseq
re-statement of tests/test_avhubert.py), loaded by our loader, exported by
``save_avhubert``; the export loads into the torch port strictly and both give
the same features. (fairseq layout -> ours -> fairseq layout being the
identity is tests/test_avhubert.py::test_round_trip_is_exact.) The compact
encoder: ``torch_layout`` state dicts of params and batch statistics.
"""
import pathlib
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests import test_avhubert as fairseq_ref
from tests.helpers.numerics import assert_close
from tests.helpers.tiny import random_batch, tiny_config
from vsrllm_jax.formats import torch_layout
from vsrllm_jax.models.encoders import avhubert as jax_avhubert
from vsrllm_jax.models import build as build_lib
from vsrllm_jax.models.encoders import video_encoder as jax_video_encoder
from vsrllm_jax.formats import fairseq_avhubert
from vsrllm_jax.formats.fairseq_avhubert import load as load_avhubert, save as save_avhubert
from vsrllm_jax.models.vsr_model import VSRModel
from vsrllm_jax.torch_port import avhubert as torch_avhubert
from vsrllm_jax.torch_port import video_encoder as torch_video_encoder

pytestmark = pytest.mark.filterwarnings("ignore:.*weight_norm.*is deprecated:FutureWarning")

RTOL, ATOL_FRAC = 1e-4, 1e-5   # fp32 parity on real frames (tests.helpers.numerics.assert_close)
AVHUBERT_CASES = ("post_ln", "pre_ln", "add")


def _to_torch(video, mask):
  return torch.from_numpy(np.array(video)), torch.from_numpy(np.array(mask))


def _max_err(got, want, mask):
  return float(np.max(np.abs(got[mask] - want[mask])))


# ----------------------------------------------------------------- AV-HuBERT (fairseq layout)

@pytest.fixture(scope="module")
def avhubert_exports(tmp_path_factory, torch_single_thread):
  """Per case: (config, JAX variables, the exported .pt's state dict, the torch port)."""
  del torch_single_thread
  root = tmp_path_factory.mktemp("torch_port_avhubert")
  out = {}
  for i, case in enumerate(AVHUBERT_CASES):
    ref_config = fairseq_ref._config(case)
    ref = fairseq_ref.make_reference(ref_config, seed=10 + i)
    source = root / f"{case}.pt"
    torch.save({"model": ref.state_dict(), "cfg": fairseq_ref._cfg_blob(ref_config)}, source)
    config, variables = load_avhubert(source)
    assert config == ref_config
    save_avhubert(root / f"{case}_export.pt", config, variables)   # video encoder only
    state = torch.load(root / f"{case}_export.pt", weights_only=True)["model"]
    port = torch_avhubert.AvHubertEncoder.from_config(config)
    port.load_state_dict(state, strict=True)
    out[case] = dict(config=config, variables=variables, state=state, port=port, ref=ref)
  return out


@pytest.mark.parametrize("case", AVHUBERT_CASES)
def test_avhubert_port_matches_jax(avhubert_exports, case):
  ex = avhubert_exports[case]
  video, mask = fairseq_ref._batch()                           # [B, T, H, W, 1] uint8, padded
  want = np.asarray(jax.jit(jax_avhubert.AvHubertEncoder(ex["config"]).apply)(
      ex["variables"], video, mask))
  with torch.no_grad():
    got = ex["port"](*_to_torch(video, mask)).numpy()
    got_4d = ex["port"](*_to_torch(video[..., 0], mask)).numpy()       # [B, T, H, W]
    got_float = ex["port"](torch.from_numpy(video.astype(np.float32)),
                           torch.from_numpy(mask)).numpy()
  err = _max_err(got, want, mask)
  print(f"avhubert[{case}] torch port vs JAX: max abs {err:.2e}")
  assert_close(got[mask], want[mask], rtol=RTOL, atol_frac=ATOL_FRAC)
  assert np.all(got[~mask] == 0.0)
  np.testing.assert_array_equal(got_4d, got)
  np.testing.assert_array_equal(got_float, got)
  # Whatever padded frames hold, real frames do not change.
  noisy = np.where(mask[:, :, None, None, None], video, 255 - video)
  with torch.no_grad():
    got_noisy = ex["port"](*_to_torch(noisy, mask)).numpy()
  assert_close(got_noisy[mask], got[mask], rtol=1e-5, atol_frac=1e-6)


def test_avhubert_port_state_dict_is_the_export(avhubert_exports):
  """Same keys, order and shapes as the exporter writes; the fairseq reference (the whole
  AVHubertModel) reads the port's state dict, and ``encoder_state_dict`` cuts a full one."""
  ex = avhubert_exports["pre_ln"]
  ours = ex["port"].state_dict()
  weights = lambda keys: [k for k in keys if not k.endswith(".num_batches_tracked")]
  assert set(ours) == set(ex["state"]) and weights(ours) == weights(ex["state"])
  assert all(ours[k].shape == ex["state"][k].shape for k in ours)
  result = ex["ref"].load_state_dict(ours, strict=False)
  assert not result.unexpected_keys
  assert all(fairseq_avhubert.is_known_unused(k) for k in result.missing_keys)
  full = ex["ref"].state_dict()
  for prefix in torch_avhubert.PREFIXES:
    tuned = {prefix + k: v for k, v in full.items()}
    if prefix:                                       # the rest of a fine-tuned model
      tuned["decoder.embed_tokens.weight"] = torch.zeros(3, 2)
    assert set(torch_avhubert.encoder_state_dict(tuned)) == set(ours)
  with pytest.raises(ValueError, match="feature_extractor_video.proj.weight"):
    torch_avhubert.encoder_state_dict({"decoder.embed_tokens.weight": torch.zeros(3, 2)})


def test_avhubert_port_matches_fairseq_reference(avhubert_exports):
  """The port and the module-for-module fairseq re-statement agree on the same weights."""
  ex = avhubert_exports["post_ln"]
  video, mask = fairseq_ref._batch()
  x = (torch.from_numpy(video).float() / 255.0 - fairseq_ref.PIXEL_MEAN) / fairseq_ref.PIXEL_STD
  x = x.masked_fill(~torch.from_numpy(mask)[:, :, None, None, None], 0.0)
  with torch.no_grad():
    want = ex["ref"](x.permute(0, 4, 1, 2, 3), torch.from_numpy(~mask)).numpy()
    got = ex["port"](*_to_torch(video, mask)).numpy()
  assert_close(got[mask], want[mask], rtol=1e-5, atol_frac=1e-6)


def test_config_errors_are_clear():
  with pytest.raises(ValueError, match="lacks.*conv_pos"):
    torch_avhubert.AvHubertShape.of({"hidden_dim": 32})
  with pytest.raises(ValueError, match="video_mask must be"):
    torch_avhubert.AvHubertEncoder.from_config(jax_avhubert.AvHubertConfig(
        **fairseq_ref.TINY, conv_pos=8))(torch.zeros(1, 3, 20, 20), torch.ones(1, 4, dtype=bool))
  with pytest.raises(ValueError, match=r"VideoEncoder: video must be \[B, T, H, W\]"):
    torch_video_encoder.VideoEncoder.from_config(dict(
        stem_channels=4, resnet_channels=(4,), resnet_blocks=(1,), hidden_dim=8, num_layers=1,
        num_heads=2, mlp_dim=8))(torch.zeros(1, 3, 16, 16, 3), torch.ones(1, 3, dtype=bool))
  assert (torch_video_encoder.PIXEL_MEAN, torch_video_encoder.PIXEL_STD) == (
      jax_video_encoder.PIXEL_MEAN, jax_video_encoder.PIXEL_STD)


def test_ports_do_not_import_jax():
  code = ("import sys, vsrllm_jax.torch_port.avhubert, vsrllm_jax.torch_port.video_encoder; "
          "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax')); "
          "assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True,
                 cwd=pathlib.Path(__file__).resolve().parents[1])


# ----------------------------------------------------------------- the compact encoder

def _random_variables(abstract, seed):
  """Random values for every leaf of the encoder's abstract variables, away from any init:
  activations stay O(1). (Cheaper than the jitted init, which takes ~15 s to compile.)"""
  rng = np.random.default_rng(seed)

  def fill(path, x):
    names = [p.key for p in path]
    shape = x.shape[1:] if "layers" in names else x.shape       # scan-stacked: [L, ...]
    draw = {"kernel": lambda: rng.normal(size=x.shape) / np.sqrt(np.prod(shape[:-1])),
            "scale": lambda: rng.normal(1.0, 0.1, x.shape),
            "bias": lambda: rng.normal(0.0, 0.1, x.shape),
            "negative_slope": lambda: rng.uniform(0.05, 0.5, x.shape),
            "mean": lambda: rng.normal(0.0, 0.2, x.shape),
            "var": lambda: rng.uniform(0.5, 2.0, x.shape)}
    if names[-1] not in draw:
      raise AssertionError(f"no random draw for {'/'.join(names)}")
    return draw[names[-1]]().astype(x.dtype)
  return jax.tree_util.tree_map_with_path(fill, abstract)


@pytest.fixture(scope="module")
def compact_encoder(torch_single_thread):
  """The tiny config's encoder (two layers, two blocks in the first and last stages) with
  random params and batch statistics, and its torch port loaded strictly."""
  del torch_single_thread
  config = tiny_config("mlp")
  config.encoder.num_layers = 2
  config.encoder.resnet_blocks = (2, 1, 1, 2)
  model = build_lib.build_model(config)
  batch = {k: jnp.asarray(v) for k, v in random_batch(config, 3, seed=1).items()}
  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
  boxed = jax.eval_shape(lambda: model.init(rngs, batch))
  abstract = flax.linen.meta.unbox(boxed)
  variables = _random_variables({c: {"encoder": abstract[c]["encoder"]}
                                 for c in ("params", "batch_stats")}, seed=2)
  plan = lambda tree: torch_layout.plan(model, tree, variables=abstract, args=(batch,),
                                        method=VSRModel.encode, prefix=("encoder",))
  state = {**torch_layout.to_state_dict(variables["params"], plan(boxed["params"])),
           **torch_layout.to_state_dict(variables["batch_stats"], plan(boxed["batch_stats"]))}
  port = torch_video_encoder.VideoEncoder.from_config(model.encoder_config)
  port.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
  return dict(model=model, variables=variables, batch=batch, state=state, port=port)


def test_compact_encoder_port_matches_jax(compact_encoder):
  ce = compact_encoder
  batch = ce["batch"]
  feats, mask = jax.jit(lambda v, b: ce["model"].apply(v, b, method=VSRModel.encode))(
      ce["variables"], batch)
  want, mask = np.asarray(feats), np.asarray(mask)
  assert not mask.all() and mask.any(axis=1).all()              # padding in the batch
  with torch.no_grad():
    got = ce["port"](*_to_torch(batch["video"], batch["video_mask"])).numpy()
  err = _max_err(got, want, mask)
  print(f"compact encoder torch port vs JAX: max abs {err:.2e}")
  assert_close(got[mask], want[mask], rtol=RTOL, atol_frac=ATOL_FRAC)
  assert np.all(got[~mask] == 0.0)


def test_compact_encoder_state_dict_layouts(compact_encoder):
  """Stem kernel OIDHW, a stacked layer split per index, batch statistics as buffers."""
  ce = compact_encoder
  enc = ce["variables"]["params"]["encoder"]
  stem = np.asarray(enc["stem_conv"]["kernel"])                           # [kt, kh, kw, 1, C]
  np.testing.assert_array_equal(ce["state"]["stem_conv.weight"], stem.transpose(4, 3, 0, 1, 2))
  wi = np.asarray(enc["transformer"]["layers"]["mlp"]["wi"]["kernel"])    # [L, D, F]
  np.testing.assert_array_equal(ce["state"]["transformer.layers.1.mlp.wi.weight"], wi[1].T)
  var = np.asarray(ce["variables"]["batch_stats"]["encoder"]["stem_bn"]["var"])
  np.testing.assert_array_equal(ce["port"].stem_bn.running_var.numpy(), var)
  assert set(ce["port"].state_dict()) == set(ce["state"])
