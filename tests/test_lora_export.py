"""A LoRA run end to end: trained adapters in checkpoints, open_run, both exports
(merged Hugging Face directory, base + PEFT adapter) against our fp32 logits, and
PyTorch transcripts equal to JAX's on LRS3-layout clips with cluster counts (the
export's deduplication).

One tiny run (random LLM with adapters on every target and a learning rate of their
own, the compact encoder, the mlp projector) on synthetic clips written in LRS3's
layout with random runs of 1-3 frames.
"""
from __future__ import annotations

import json
import os

import flax
import jax
import numpy as np
import pytest
import torch
import transformers

from tests.helpers import tiny_run_config
from tests.helpers.numerics import assert_close
from vsrllm_jax import convert, from_torch
from vsrllm_jax.data.synthetic import lrs3_layout
from vsrllm_jax.formats import export_bundle, peft as peft_format
from vsrllm_jax.models import lora
from vsrllm_jax.models.vsr_model import VSRModel
from vsrllm_jax.run import checkpoint, open as open_lib
from vsrllm_jax.training import loop

ALL = tuple(lora.TARGETS)
LENGTHS, SEQ = (21, 14, 5), 21            # a right-padded batch of token ids
# fp32 on both sides; errors seen: 9e-8 with |logit| <= 0.44 (2e-7 of the largest) for
# both forms (the tiny LLM's init is small); merged kernels round W + s A B once more.
RTOL, ATOL_FRAC = 1e-4, 1e-5

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("lora_run")
  manual = root / "manifests"
  for split, stem, num, seed in (("train", "train", 16, 0), ("validation", "valid", 4, 1),
                                 ("test", "test", 4, 2)):
    clips = lrs3_layout.synthetic_clips(num, split=split, seed=seed, image_size=24,
                                         max_frames=40)
    lrs3_layout.write_lrs3_like_tree(manual, clips, stem)
  config = tiny_run_config.get_config("steps=4")
  config.data.update(dict(name="lrs3", manifest_dir=str(manual), data_dir=str(root / "tfds"),
                          use_cluster_counts=True, source_image_size=24, image_size=16,
                          max_frames=40, max_label_tokens=10))
  config.batch_size = config.eval_batch_size = 8   # in-process: 8 simulated devices
  config.eval_every, config.checkpoint_every = 4, 2
  config.llm.lora.update(dict(enabled=True, targets=ALL, rank=4, alpha=8.0, dropout=0.1))
  config.optim.param_groups = (("^projector/", "main"), ("/lora_[ab]$", "lora"), (".*", None))
  config.optim.schedules.lora = dict(config.optim.schedules.main.to_dict(), peak_lr=5e-3)
  workdir = str(root / "run")
  loop.train_and_evaluate(config, workdir)
  return workdir


@pytest.fixture(scope="module")
def opened(run):
  return open_lib.open_run(run, on_host=True)


@pytest.fixture(scope="module")
def exports(run, tmp_path_factory):
  root = tmp_path_factory.mktemp("lora_exports")
  return {form: (str(root / form), convert.convert(run, str(root / form), lora_export=form))
          for form in ("merged", "peft")}


def _adapters(params) -> dict:
  return flax.traverse_util.flatten_dict(lora.split_adapters(params["llm"])[1])


def _llm_logits(opened, params, ids, mask):
  model = opened.model
  return np.asarray(jax.jit(lambda p: model.apply(
      {"params": p}, ids, attention_mask=mask,
      method=lambda s, i, attention_mask: s.llm(i, attention_mask=attention_mask)))(params))


def _batch(vocab_size):
  rng = np.random.default_rng(0)
  ids = rng.integers(0, vocab_size, (len(LENGTHS), SEQ)).astype(np.int32)
  mask = (np.arange(SEQ)[None] < np.asarray(LENGTHS)[:, None]).astype(np.int32)
  return ids, mask


def _hf_logits(hf, ids, mask):
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.long)
  with torch.no_grad():
    return hf.eval()(input_ids=t(ids), attention_mask=t(mask), position_ids=t(positions)
                     ).logits.numpy()


def test_adapters_train_are_checkpointed_and_opened(run, opened):
  adapters = _adapters(opened.params)
  assert len(adapters) == 2 * len(ALL)
  assert all(np.abs(v).max() > 0 for v in adapters.values())      # B moved off zero
  assert {opened.labels[("llm",) + k] for k in adapters} == {"lora"}
  # open_run restores exactly the checkpoint's adapters, which differ from the init.
  ckpts = checkpoint.Checkpoints(run, 2)
  try:
    step, best = ckpts.select(None)
    from vsrllm_jax.run import state as state_lib  # pylint: disable=g-import-not-at-top
    layout = state_lib.layout(opened.model, opened.config, opened.setup.mesh)
    state, _ = ckpts.restore(step, layout.abstract(), best=best)   # with optimizer state
  finally:
    ckpts.close()
  restored = _adapters(jax.device_get(state.params))
  for k, v in adapters.items():
    np.testing.assert_array_equal(np.asarray(restored[k]), np.asarray(v), err_msg=str(k))
  # ... and they are used: the LLM's logits move when they are zeroed.
  ids, mask = _batch(opened.model.llm_config.vocab_size)
  params = jax.device_get(opened.params)
  without = jax.tree_util.tree_map_with_path(
      lambda p, x: np.zeros_like(x) if "lora_b" in jax.tree_util.keystr(p) else x, params)
  diff = np.abs(_llm_logits(opened, params, ids, mask) - _llm_logits(opened, without, ids, mask))
  assert diff.max() > 1e-3, diff.max()


def test_merged_export_gives_our_logits_in_transformers(opened, exports):
  out, meta = exports["merged"]
  assert meta["llm"]["lora"] == {"form": "merged", "targets": list(ALL), "rank": 4,
                                 "alpha": 8.0, "dropout": 0.1}
  assert meta["llm"]["trained"] and export_bundle.lora_adapter_dir(out, meta) is None
  assert not os.path.exists(os.path.join(out, export_bundle.LORA_ADAPTER_DIR))
  ids, mask = _batch(opened.model.llm_config.vocab_size)
  ours = _llm_logits(opened, jax.device_get(opened.params), ids, mask)
  hf, info = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.join(out, "llm"), dtype=torch.float32, attn_implementation="eager",
      output_loading_info=True)
  assert not any(info.values()), info
  real = mask.astype(bool)
  theirs = _hf_logits(hf, ids, mask)
  print(f"merged export: transformers vs ours, max abs error "
        f"{np.abs(ours[real] - theirs[real]).max():.2e} (max |logit| "
        f"{np.abs(theirs[real]).max():.2f})")
  assert np.abs(theirs[real]).max() > 0.1
  assert_close(ours[real], theirs[real], rtol=RTOL, atol_frac=ATOL_FRAC)


def test_peft_export_gives_our_logits_in_transformers_with_peft(opened, exports):
  import peft  # pylint: disable=g-import-not-at-top
  out, meta = exports["peft"]
  adapter_dir = export_bundle.lora_adapter_dir(out, meta)
  assert adapter_dir == os.path.join(out, export_bundle.LORA_ADAPTER_DIR)
  assert sorted(os.listdir(adapter_dir)) == [peft_format.ADAPTER_CONFIG,
                                             peft_format.ADAPTER_WEIGHTS]
  written = json.load(open(os.path.join(adapter_dir, peft_format.ADAPTER_CONFIG)))
  assert written["base_model_name_or_path"] == os.path.join(out, "llm")
  assert not meta["llm"]["trained"]            # the directory holds the (frozen) base model
  ids, mask = _batch(opened.model.llm_config.vocab_size)
  ours = _llm_logits(opened, jax.device_get(opened.params), ids, mask)
  base = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.join(out, "llm"), dtype=torch.float32, attn_implementation="eager")
  model = peft.PeftModel.from_pretrained(base, adapter_dir)
  real = mask.astype(bool)
  theirs = _hf_logits(model, ids, mask)
  print(f"PEFT export: transformers + peft vs ours, max abs error "
        f"{np.abs(ours[real] - theirs[real]).max():.2e} (max |logit| "
        f"{np.abs(theirs[real]).max():.2f})")
  assert_close(ours[real], theirs[real], rtol=RTOL, atol_frac=ATOL_FRAC)


def test_pytorch_prompt_deduplicates_as_ours(opened, exports):
  """The exported model's prompt with the clips' cluster counts: one token per run, the
  same embeddings as our prompt's."""
  from vsrllm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from vsrllm_jax.torch_port.model import VsrLlm  # pylint: disable=g-import-not-at-top
  config = opened.config
  batch = next(iter(pipeline.eval_batches(config.data, opened.setup.tokenizer, "test",
                                          global_batch_size=8,
                                          source=pipeline.data_source(config.data, "test"))))
  counts = np.asarray(batch["cluster_counts"])
  assert counts.max() > 1                     # runs longer than a frame: dedup matters
  from vsrllm_jax.data import batch as batch_lib  # pylint: disable=g-import-not-at-top
  inputs = {k: np.asarray(v) for k, v in batch_lib.model_inputs(batch).items()}
  embeds, mask, _ = opened.model.apply({"params": opened.params, **opened.model_state}, inputs,
                                       method=VSRModel.prompt)
  embeds, mask = np.asarray(embeds), np.asarray(mask)
  model, _, _ = VsrLlm.from_export(exports["merged"][0])
  t = lambda k: torch.from_numpy(np.asarray(batch[k]))
  with torch.no_grad():
    theirs, their_mask = model.prompt(t("video"), t("video_mask"), cluster_counts=t(
        "cluster_counts"))
  theirs, their_mask = theirs.numpy(), their_mask.numpy()
  runs = (counts > 0).sum(axis=1)
  instr = np.asarray(batch["instruction_mask"]).sum(axis=1)
  np.testing.assert_array_equal(their_mask.sum(axis=1), instr + runs)
  np.testing.assert_array_equal(mask.sum(axis=1), instr + runs)
  for row in range(len(runs)):
    assert_close(theirs[row][their_mask[row]], embeds[row][mask[row]], rtol=1e-5,
                 atol_frac=1e-6)


@pytest.mark.parametrize("form", ["merged", "peft"])
def test_pytorch_transcribes_the_test_split_as_jax_does(run, exports, form):
  from vsrllm_jax.tools import compare_torch  # pylint: disable=g-import-not-at-top
  out, _ = exports[form]
  result = compare_torch.compare(run, out, "test", "greedy")
  rows = [json.loads(l) for l in open(os.path.join(out, "compare_test_greedy.jsonl"))]
  assert result["clips"] == 4 and result["identical"] == 1.0, rows
  assert any(r["hypothesis"] for r in rows)


def test_peft_export_imports_back_with_its_adapters(opened, exports, tmp_path):
  out, meta = exports["peft"]
  new = str(tmp_path / "imported")
  step = from_torch.import_export(out, new)
  back = open_lib.open_run(new, step=step, on_host=True)
  got, want = _adapters(jax.device_get(back.params)), _adapters(jax.device_get(opened.params))
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=str(k))


def test_merged_export_imports_back_as_the_same_function(opened, exports, tmp_path):
  """Merged kernels and fresh adapters (B = 0): the same LLM, LoRA training can go on."""
  out, _ = exports["merged"]
  new = str(tmp_path / "imported")
  back = open_lib.open_run(new, step=from_torch.import_export(out, new), on_host=True)
  assert back.model.llm_config.lora == opened.model.llm_config.lora
  adapters = _adapters(jax.device_get(back.params))
  assert sorted(adapters) == sorted(_adapters(jax.device_get(opened.params)))
  assert all(not np.any(v) for k, v in adapters.items() if k[-1] == "lora_b")
  ids, mask = _batch(opened.model.llm_config.vocab_size)
  real = mask.astype(bool)
  assert_close(_llm_logits(back, jax.device_get(back.params), ids, mask)[real],
               _llm_logits(opened, jax.device_get(opened.params), ids, mask)[real],
               rtol=RTOL, atol_frac=ATOL_FRAC)


def test_llm_reference_refuses_merged_adapters(run, tmp_path):
  with pytest.raises(ValueError, match="llm_reference needs a frozen LLM read from"):
    convert.convert(run, str(tmp_path / "ref"), llm_reference=True, lora_export="peft")
  with pytest.raises(ValueError, match="with LoRA, --lora_export=peft"):
    convert.convert(run, str(tmp_path / "ref"), llm_reference=True)
