"""Flax params <-> PyTorch state dicts (vsrllm_jax/torch_layout.py): exact, for every projector."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers.tiny import random_batch, tiny_config
from vsrllm_jax.formats import torch_layout
from vsrllm_jax.models import build as build_lib
from vsrllm_jax.models import projectors
from vsrllm_jax.models.vsr_model import VSRModel


def projector_rules(name):
  config = tiny_config(name)
  model = build_lib.build_model(config)
  batch = {k: jnp.asarray(v) for k, v in random_batch(config, 2).items()}
  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
  boxed = jax.eval_shape(lambda: model.init(rngs, batch))
  rules = torch_layout.plan(model, boxed["params"], variables=nn_unbox(boxed), args=(batch,),
                            method=VSRModel.project, kwargs=dict(train=False),
                            prefix=("projector",))
  params = nn_unbox(model.init(rngs, batch)["params"])
  return rules, params


def nn_unbox(tree):
  return flax.linen.meta.unbox(tree)


@pytest.mark.parametrize("name", projectors.names())
def test_round_trip_is_bit_identical(name):
  rules, params = projector_rules(name)
  state = torch_layout.to_state_dict(params, rules)
  assert all("/" not in k and "{i}" not in k for k in state)
  back = flax.traverse_util.flatten_dict(torch_layout.from_state_dict(state, rules))
  flat = flax.traverse_util.flatten_dict(jax.device_get(params))
  assert set(back) == {k for k in flat if k[0] == "projector"}
  for k, v in back.items():
    assert v.dtype == flat[k].dtype and v.shape == flat[k].shape, k
    np.testing.assert_array_equal(v, flat[k], err_msg="/".join(k))


def test_layouts_are_torch_layouts():
  rules, params = projector_rules("qformer")
  state = torch_layout.to_state_dict(params, rules)
  q = params["projector"]["layers"]["self_attn"]["attn"]["query"]["kernel"]   # [L, E, H, D]
  w = state["layers.1.self_attn.attn.query.weight"]                          # Linear: [H*D, E]
  assert w.shape == (q.shape[2] * q.shape[3], q.shape[1])
  np.testing.assert_array_equal(w, np.asarray(q[1]).reshape(q.shape[1], -1).T)
  out = params["projector"]["layers"]["self_attn"]["attn"]["out"]["kernel"]  # [L, H, D, E]
  assert state["layers.0.self_attn.attn.out.weight"].shape == (out.shape[3],
                                                              out.shape[1] * out.shape[2])
  assert "layers.0.self_attn.norm.weight" in state                         # LayerNorm scale
  rules, params = projector_rules("conv_abstractor")
  state = torch_layout.to_state_dict(params, rules)
  convs = {k: v for k, v in state.items() if v.ndim == 3}                   # Conv1d: OIW
  assert convs, sorted(state)
  for key, w in convs.items():
    path = ("projector",) + tuple(key.split(".")[:-1]) + ("kernel",)
    k = flax.traverse_util.flatten_dict(params)[path]                     # [k, in, out]
    np.testing.assert_array_equal(w, np.transpose(np.asarray(k), (2, 1, 0)))


def test_missing_and_unexpected_keys_are_named():
  rules, params = projector_rules("mlp")
  state = torch_layout.to_state_dict(params, rules)
  with pytest.raises(KeyError, match="dense0.weight"):
    torch_layout.from_state_dict({k: v for k, v in state.items() if k != "dense0.weight"}, rules)
  with pytest.raises(KeyError, match="extra.weight"):
    torch_layout.from_state_dict({**state, "extra.weight": np.zeros(2)}, rules)
  with pytest.raises(ValueError, match="dense0.weight"):
    torch_layout.from_state_dict({**state, "dense0.weight": np.zeros(3)}, rules)
