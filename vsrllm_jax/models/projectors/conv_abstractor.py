"""``conv_abstractor``: a locality-preserving convolutional resampler (C-Abstractor).

Honeybee's C-Abstractor (Cha et al., 2024) in time instead of image space:
residual convolution blocks, a masked average pool that shortens the sequence
by ``stride``, more residual blocks, and a Dense-GELU-Dense readout. Unlike
attention pooling, every output token is tied to a window of frames, so word
order survives by construction; unlike a per-frame MLP, each token sees
``kernel_size`` neighbouring frames, enough to tell which word a frame
belongs to.

Padding never leaks: padded frames are zeroed before every convolution, so a
real frame sees the same zeros at the end of a clip however long the padding.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vsrllm_jax.models import layers
from vsrllm_jax.models.projectors.registry import register
from vsrllm_jax.models.projectors.base import Projector, ProjectorOutput


class TemporalConv(nn.Module):
  """A 1-D 'SAME' convolution over time whose kernel carries logical axes."""
  TORCH_LAYOUT = {"kernel": "conv"}   # torch_layout: [*k, in, out] -> [out, in, *k]
  features: int
  kernel_size: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):                                             # [B, T, C]
    kernel = self.param("kernel", layers.with_axes(layers.default_kernel_init,
                                                   ("conv_t", "embed", "mlp")),
                        (self.kernel_size, x.shape[-1], self.features), self.param_dtype)
    bias = self.param("bias", layers.with_axes(nn.initializers.zeros, ("mlp",)),
                      (self.features,), self.param_dtype)
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), jnp.asarray(kernel, self.dtype), window_strides=(1,),
        padding="SAME", dimension_numbers=("NWC", "WIO", "NWC"))
    return y + jnp.asarray(bias, self.dtype)


class ConvBlock(nn.Module):
  """Pre-LN residual block: conv over time, GELU, Dense (a ResNet block in 1-D)."""
  kernel_size: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    width = x.shape[-1]
    h = layers.LayerNorm(name="norm", **kw)(x) * mask[..., None].astype(x.dtype)
    h = nn.gelu(TemporalConv(width, self.kernel_size, name="conv", **kw)(h), approximate=False)
    return x + layers.Dense(width, ("mlp", "embed"), name="out", **kw)(h)


@register("conv_abstractor")
class ConvAbstractorProjector(Projector):
  hidden_dim: int | None = None   # block width; default output_dim
  depth: int = 2                  # residual blocks before and after the pool
  kernel_size: int = 5            # frames each convolution sees
  stride: int = 2                 # temporal downsampling of the pool (1 keeps T)

  @nn.compact
  def __call__(self, features, features_mask, *, text=None, text_mask=None, train=False):
    del text, text_mask, train
    if self.depth < 0 or self.kernel_size < 1 or self.stride < 1:
      raise ValueError(f"projector conv_abstractor needs depth >= 0, kernel_size >= 1 and "
                       f"stride >= 1; got {self.depth}, {self.kernel_size}, {self.stride}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    width = self.hidden_dim or self.output_dim
    mask = features_mask.astype(bool)
    x = layers.Dense(width, ("features", "embed"), name="in_proj", **kw)(features)
    for i in range(self.depth):
      x = ConvBlock(self.kernel_size, name=f"pre{i}", **kw)(x, mask)
    x, mask = layers.masked_temporal_pool(x, mask, self.stride)       # [B, T/stride, W]
    for i in range(self.depth):
      x = ConvBlock(self.kernel_size, name=f"post{i}", **kw)(x, mask)
    x = layers.LayerNorm(name="out_norm", **kw)(x)
    tokens = layers.Mlp(width, out_dim=self.output_dim, name="readout", **kw)(x)
    return ProjectorOutput(tokens=tokens, mask=mask, aux_losses={}, embeddings={})
