"""The convert command: a training run -> HF LLM dir, encoder and projector in torch layouts."""
import importlib.util
import json
import os
import shutil

import flax
import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from tests.helpers.numerics import assert_close
from tests.helpers import tiny_run_config
from vsrllm_jax.run import checkpoint, setup as setup_lib
from vsrllm_jax import convert, from_torch, sharding
from vsrllm_jax.formats import export_bundle
from vsrllm_jax.formats import projector as projector_format
from vsrllm_jax.models import encoders
from vsrllm_jax.training import loop
from vsrllm_jax.run import open as open_lib
from vsrllm_jax.run import state as state_lib
from vsrllm_jax.run import workdir as workdir_lib
from vsrllm_jax.models import build as build_lib


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  config = tiny_run_config.get_config("steps=6")
  config.data.data_dir = str(tmp_path_factory.mktemp("data"))
  config.eval_every = 3
  config.batch_size = config.eval_batch_size = 8   # in-process: 8 simulated devices
  loop.train_and_evaluate(config, str(workdir))
  return str(workdir)


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("export") / "out")
  return out, convert.convert(run, out)


def test_export_writes_every_part(exported):
  out, meta = exported
  assert sorted(os.listdir(out)) == ["encoder.safetensors", "llm", "projector.safetensors",
                                     export_bundle.CONFIG_FILE]
  on_disk = json.load(open(os.path.join(out, export_bundle.CONFIG_FILE)))
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
  _, _, params, _ = _opened(run)
  emb = np.asarray(params["llm"]["embed_tokens"]["embedding"])
  np.testing.assert_array_equal(model.get_input_embeddings().weight.detach().numpy(), emb)
  assert isinstance(model, torch.nn.Module)


def _opened(run):
  """(config, model, params, model_state) of the run's best checkpoint, on the host."""
  trained = open_lib.open_run(run, on_host=True)
  return (trained.config, trained.model) + trained.host_weights()


def _assert_same(got, want):
  got, want = flax.traverse_util.flatten_dict(got), flax.traverse_util.flatten_dict(want)
  assert got and set(got) == set(want)
  for k in want:
    assert got[k].dtype == want[k].dtype, k
    np.testing.assert_array_equal(got[k], want[k], err_msg="/".join(k))


def test_jax_to_torch_files_to_jax_is_bit_identical(run, exported, tmp_path):
  out, _ = exported
  config, model, params, model_state = _opened(run)
  projector = projector_format.from_state_dict(
      model, config, load_file(os.path.join(out, "projector.safetensors")))
  _assert_same(projector["projector"], params["projector"])
  meta = export_bundle.read(out)
  kind = encoders.KINDS.get(meta["encoder"]["kind"])
  _, encoder = kind.import_export(out, meta["encoder"], config.encoder, str(tmp_path))
  _assert_same(encoder["params"], params["encoder"])
  _assert_same(encoder["batch_stats"], model_state["batch_stats"]["encoder"])


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
  # A checkpoint that lacks the configured projector's weights (the run trained another).
  config["projector"] = {"name": "qformer"}
  (bad / "config.json").write_text(json.dumps(config))
  os.symlink(os.path.join(run, checkpoint.BEST_DIR), bad / checkpoint.BEST_DIR)
  with pytest.raises(ValueError, match=r"does not hold this model's weights: missing \d+ "
                                       r"\['params/projector/.*unexpected"):
    convert.convert(str(bad), str(tmp_path / "bad_out"))
  assert not (tmp_path / "bad_out").exists()
  assert checkpoint.BEST_DIR   # the run itself is untouched


def test_import_of_an_export_lacking_weights_names_them(exported, tmp_path):
  out, _ = exported
  bad = str(tmp_path / "export")
  shutil.copytree(out, bad)
  tensors = load_file(os.path.join(bad, "projector.safetensors"))
  dropped = sorted(tensors)[0]
  del tensors[dropped]
  save_file(tensors, os.path.join(bad, "projector.safetensors"))
  with pytest.raises(KeyError, match=f"state dict has no {dropped!r}"):
    from_torch.import_export(bad, str(tmp_path / "new"))


def test_torch_export_imports_back_bit_identical_and_training_continues(run, exported,
                                                                        tmp_path):
  out, meta = exported
  new = str(tmp_path / "imported")
  step = from_torch.import_export(out, new)
  assert step == meta["source"]["step"]
  config, _ = setup_lib.resolve_config(workdir_lib.load_config(new))
  _, _, params, model_state = _opened(run)
  abstract = state_lib.layout(build_lib.build_model(config), config,
                              sharding.make_mesh((1, 1, 1), jax.devices()[:1])).abstract()
  ckpts = checkpoint.Checkpoints(new, 2)
  state, restored_meta = ckpts.restore(step, abstract)
  ckpts.close()
  assert restored_meta["imported_from"] == os.path.abspath(out)
  _assert_same(jax.device_get(state.params), params)           # JAX -> PyTorch -> JAX
  _assert_same(jax.device_get(state.model_state), model_state)
  # The train command's config file for the new run continues from the imported step.
  spec = importlib.util.spec_from_file_location("imported_config", os.path.join(new, "config.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.total_steps = step + 2
  loop.train_and_evaluate(config, new)
  ckpts = checkpoint.Checkpoints(new, 2)
  assert ckpts.latest_step() == step + 2
  ckpts.close()


def test_pytorch_side_transcribes_the_test_split_as_jax_does(run, exported):
  from vsrllm_jax.tools import compare_torch  # pylint: disable=g-import-not-at-top
  out, _ = exported
  for strategy in ("greedy", "beam"):
    result = compare_torch.compare(run, out, "test", strategy)
    assert result["clips"] == 4
    assert result["identical"] == 1.0, open(
        os.path.join(out, f"compare_test_{strategy}.jsonl")).read()
    assert result["jax"]["wer"] == result["torch"]["wer"]


# --- the exported LLM directory in transformers ------------------------------------

LOGIT_LENGTHS = (23, 17, 9)   # rows: unpadded, right padded, left padded
LOGIT_SEQ = 23


def _padded_batch(vocab_size: int):
  rng = np.random.default_rng(0)
  ids = rng.integers(0, vocab_size, (len(LOGIT_LENGTHS), LOGIT_SEQ)).astype(np.int32)
  mask = np.zeros((len(LOGIT_LENGTHS), LOGIT_SEQ), np.int32)
  mask[0, :LOGIT_LENGTHS[0]] = 1
  mask[1, :LOGIT_LENGTHS[1]] = 1
  mask[2, LOGIT_SEQ - LOGIT_LENGTHS[2]:] = 1
  return ids, mask


@pytest.mark.usefixtures("torch_single_thread")
def test_exported_llm_logits_match_ours(run, exported):
  """transformers' AutoModelForCausalLM read from OUT/llm (a copy: the tiny run's LLM is
  random, not a reference) gives our fp32 logits on a padded batch."""
  out, meta = exported
  assert meta["llm"] == {"dir": "llm", "trained": meta["llm"]["trained"]}   # a copy, no reference
  _, model, params, _ = _opened(run)
  assert {x.dtype for x in jax.tree.leaves(params["llm"])} == {np.dtype(np.float32)}
  ids, mask = _padded_batch(model.llm_config.vocab_size)

  ours = np.asarray(jax.jit(lambda p, i, m: model.apply(
      {"params": p}, i, attention_mask=m, method=lambda s, i, attention_mask: s.llm(
          i, attention_mask=attention_mask)))(params, ids, mask))

  hf, info = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.join(out, "llm"), dtype=torch.float32, attn_implementation="eager",
      output_loading_info=True)
  assert not any(info.values()), info
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)   # real tokens counted, as ours
  t = lambda a: torch.as_tensor(a, dtype=torch.long)
  with torch.no_grad():
    theirs = hf.eval()(input_ids=t(ids), attention_mask=t(mask), position_ids=t(positions)).logits
  theirs = theirs.numpy()

  real = mask.astype(bool)
  assert ours.shape == theirs.shape == (len(LOGIT_LENGTHS), LOGIT_SEQ, model.llm_config.vocab_size)
  assert ours.dtype == theirs.dtype == np.float32
  err = float(np.abs(ours[real] - theirs[real]).max())
  scale = float(np.abs(theirs[real]).max())
  print(f"exported LLM (trained={meta['llm']['trained']}): transformers vs ours fp32 logits, "
        f"max abs error {err:.2e} (max |logit| {scale:.2f})")
  assert scale > 0.1                 # logits large enough for the tolerance to mean something
  assert_close(ours[real], theirs[real], rtol=1e-4, atol_frac=1e-5)
  # Padding moves nothing: the left-padded row's logits are those of its tokens unpadded.
  alone = np.asarray(model.apply({"params": params}, ids[2:, LOGIT_SEQ - LOGIT_LENGTHS[2]:],
                                 method=lambda s, i: s.llm(i)))
  assert_close(ours[2, LOGIT_SEQ - LOGIT_LENGTHS[2]:], alone[0], rtol=1e-5, atol_frac=1e-6)
