"""The convert command: a training run -> HF LLM dir, encoder and projector in torch layouts."""
import json
import os

import flax
import numpy as np
import pytest
from safetensors.numpy import load_file

from tests import tiny_run_config
from vsrllm_jax import checkpoint, convert, torch_layout, train
from vsrllm_jax.models.vsr_model import VSRModel


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  config = tiny_run_config.get_config("steps=6")
  config.data.data_dir = str(tmp_path_factory.mktemp("data"))
  config.eval_every = 3
  config.batch_size = config.eval_batch_size = 8   # in-process: 8 simulated devices
  train.train_and_evaluate(config, str(workdir))
  return str(workdir)


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("export") / "out")
  return out, convert.convert(run, out)


def test_export_writes_every_part(exported):
  out, meta = exported
  assert sorted(os.listdir(out)) == ["encoder.safetensors", "llm", "projector.safetensors",
                                     convert.CONFIG_FILE]
  on_disk = json.load(open(os.path.join(out, convert.CONFIG_FILE)))
  assert on_disk == json.loads(json.dumps(meta))
  assert meta["projector"]["config"]["name"] == "mlp" and meta["encoder"]["format"] == \
      "torch_layout"
  assert meta["tokenizer"]["eos_ids"] and meta["tokenizer"]["instruction"]
  assert not [n for n in os.listdir(os.path.dirname(out)) if n.startswith(".")]  # no temporaries


def test_llm_dir_loads_in_transformers_with_the_checkpoint_weights(run, exported):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  out, meta = exported
  model = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(out, "llm"))
  tok = transformers.AutoTokenizer.from_pretrained(os.path.join(out, "llm"))
  assert tok.convert_tokens_to_ids(tok.eos_token) in meta["tokenizer"]["eos_ids"]
  _, _, _, params, _, _, _ = convert._restore(run, None)  # pylint: disable=protected-access
  emb = np.asarray(params["llm"]["embed_tokens"]["embedding"])
  np.testing.assert_array_equal(model.get_input_embeddings().weight.detach().numpy(), emb)
  assert isinstance(model, torch.nn.Module)


def test_jax_to_torch_to_jax_is_bit_identical(run, exported):
  out, _ = exported
  config, _, model, params, model_state, _, _ = convert._restore(run, None)  # pylint: disable=protected-access
  for part, prefix, method in (("projector", ("projector",), VSRModel.project),
                               ("encoder", ("encoder",), VSRModel.encode)):
    state = load_file(os.path.join(out, f"{part}.safetensors"))
    rules = convert._rules(model, config, prefix, method=method)  # pylint: disable=protected-access
    if part == "encoder":
      stats = convert._rules(model, config, prefix, collection="batch_stats", method=method)  # pylint: disable=protected-access
      stat_keys = {r.torch_key.replace("{i}", str(i)) for r in stats.values()
                   for i in range(r.shape[0] if r.stacked else 1)}
      back_stats = torch_layout.from_state_dict({k: state[k] for k in stat_keys}, stats)
      for k, v in flax.traverse_util.flatten_dict(back_stats).items():
        np.testing.assert_array_equal(
            v, flax.traverse_util.flatten_dict(model_state["batch_stats"])[k])
      state = {k: v for k, v in state.items() if k not in stat_keys}
    back = flax.traverse_util.flatten_dict(torch_layout.from_state_dict(state, rules))
    flat = flax.traverse_util.flatten_dict(params)
    assert back and set(back) == {k for k in flat if k[0] == part}
    for k, v in back.items():
      assert v.dtype == flat[k].dtype
      np.testing.assert_array_equal(v, flat[k], err_msg="/".join(k))


def test_failures_name_what_is_wrong_and_leave_nothing(run, tmp_path):
  out = tmp_path / "exists"
  out.mkdir()
  with pytest.raises(FileExistsError, match="exists"):
    convert.convert(run, str(out))
  with pytest.raises(ValueError, match="llm_reference needs a frozen LLM read from"):
    convert.convert(run, str(tmp_path / "ref"), llm_reference=True)   # tiny run: random LLM
  assert not (tmp_path / "ref").exists() and not [n for n in os.listdir(tmp_path)
                                                  if n.startswith(".")]
  with pytest.raises(FileNotFoundError, match="no checkpoint 999"):
    convert.convert(run, str(tmp_path / "step"), step=999)
  bad = tmp_path / "badrun"
  bad.mkdir()
  config = json.load(open(os.path.join(run, "config.json")))
  config["projector"]["name"] = "no_such_projector"
  (bad / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="no_such_projector"):
    convert.convert(str(bad), str(tmp_path / "bad_out"))
  assert checkpoint.BEST_DIR   # the run itself is untouched
