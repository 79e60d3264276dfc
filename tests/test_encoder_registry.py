"""The encoder registry: a kind registered here, in this test file alone, trains on the
tiny config, exports and imports back; and a fairseq encoder's shape is read from the
checkpoint's header, not its weights."""
import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers.tiny_run_config import get_config as tiny_run_config
from vsrllm_jax import convert, from_torch
from vsrllm_jax.formats import export_bundle, fairseq_avhubert
from vsrllm_jax.models import encoders, layers
from vsrllm_jax.models.encoders.avhubert import AvHubertConfig, init_variables
from vsrllm_jax.run import open as open_lib
from vsrllm_jax.training import loop


@dataclasses.dataclass(frozen=True)
class FrameDenseConfig:
  hidden_dim: int = 16
  frame_pixels: int = 256       # 16 x 16 grayscale frames


class FrameDenseEncoder(nn.Module):
  """Each frame's pixels through one Dense: [B, T, S, S, 1] -> [B, T, D] (fp32)."""
  config: FrameDenseConfig

  def setup(self):
    self.frame_proj = layers.Dense(self.config.hidden_dim, ("features", "embed"))

  def __call__(self, video, video_mask, train=False):
    pixels = video.reshape(video.shape[:2] + (-1,)).astype(jnp.float32) / 255.0
    return jnp.where(video_mask[..., None], self.frame_proj(pixels), 0.0)


class FrameDenseKind(encoders.EncoderKind):
  name = "test_frame_dense"
  config_type = FrameDenseConfig

  def build(self, config, **dtypes):
    del dtypes
    return FrameDenseEncoder(config)


encoders.register(FrameDenseKind())


def test_a_kind_registered_in_a_test_trains_exports_and_imports_back(tmp_path):
  config = tiny_run_config("steps=4")
  config.data.data_dir = str(tmp_path / "data")
  config.data.max_frames = 24
  config.encoder.name = "test_frame_dense"
  config.checkpoint_every = config.eval_every = 4
  config.batch_size = config.eval_batch_size = 8     # the 8 simulated devices
  run = str(tmp_path / "run")
  loop.train_and_evaluate(config, run)
  trained = open_lib.open_run(run, on_host=True)
  assert isinstance(trained.model.encoder_config, FrameDenseConfig)
  params, _ = trained.host_weights()

  export = str(tmp_path / "export")
  meta = convert.convert(run, export)
  assert meta["encoder"]["kind"] == "test_frame_dense" and meta["encoder"]["torch_twin"] is None
  assert os.path.isdir(os.path.join(export, meta["encoder"]["dir"]))
  with pytest.raises(ValueError, match="has no PyTorch twin"):
    export_bundle.torch_twin(meta)

  new = str(tmp_path / "imported")
  step = from_torch.import_export(export, new)
  imported = open_lib.open_run(new, step=step, on_host=True)
  assert imported.model.encoder_config == trained.model.encoder_config
  got, _ = imported.host_weights()
  for name in ("encoder", "projector"):
    for a, b in zip(jax.tree.leaves(got[name]), jax.tree.leaves(params[name])):
      np.testing.assert_array_equal(a, b)       # JAX -> export -> JAX, bit for bit


def _read_bytes() -> int:
  with open("/proc/self/io") as f:
    return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def test_fairseq_encoder_shape_is_read_from_the_header_not_the_weights(tmp_path):
  config = AvHubertConfig(stem_channels=4, resnet_channels=(4, 8, 8, 8),
                          resnet_blocks=(1, 1, 1, 1), hidden_dim=16, num_layers=1, num_heads=2,
                          mlp_dim=32, conv_pos=4, conv_pos_groups=2)
  variables = init_variables(config)
  big = np.zeros((64, 1 << 18), np.float32)             # 64 MiB of other weights in the file
  path = tmp_path / "large.pt"
  fairseq_avhubert.save(path, config, variables, {"final_proj.weight": big})
  assert path.stat().st_size > 60e6
  encoder_cfg = {"name": "avhubert", "path": str(path)}
  encoders.config_from(encoder_cfg)                     # imports done before counting
  before = _read_bytes()
  read = encoders.config_from(encoder_cfg)
  header_bytes = _read_bytes() - before
  assert read == config
  assert header_bytes < 1e6, header_bytes               # the pickle, not the 64 MiB
  _, loaded = fairseq_avhubert.load(path)                # the weights: read when loaded
  jax.tree.map(np.testing.assert_array_equal, loaded["params"],
               jax.device_get(nn.meta.unbox(variables["params"])))
