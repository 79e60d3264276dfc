"""Opening a trained run (``run.open``): what inference reads, and nothing more.

- A workdir written by the code before the redesign (``fixtures/old_workdir``:
  trained at commit 0b80219 with ``configs/mlp.py``, 200 steps on 64 clips)
  decodes to the transcripts that code wrote.
- decode builds no optimizer state, restores no data iterator, reads no
  pretrained weights and caches the features of the decoded split only.
- decode of a run whose LLM is ~240 MB peaks below its process baseline plus
  1.5 x the LLM's bytes (one copy of the weights, not two).
"""
import json
import os
import shutil
import subprocess
import sys

import jax
import pytest

from vsrllm_jax.configs import common
from tests.helpers.tiny import tiny_config
from vsrllm_jax import decode as decode_cmd
from vsrllm_jax.data import feature_cache, sources
from vsrllm_jax.run import checkpoint, pretrained, setup as setup_lib
from vsrllm_jax.run import state as state_lib
from vsrllm_jax.run import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OLD_WORKDIR = os.path.join(REPO, "tests", "fixtures", "old_workdir")


@pytest.fixture(scope="module")
def old_workdir(tmp_path_factory):
  """The fixture workdir, its paths pointed at this checkout and a fresh data dir."""
  workdir = tmp_path_factory.mktemp("old") / "run"
  shutil.copytree(OLD_WORKDIR, workdir)
  config = json.loads((workdir / "config.json").read_text())
  config["data"]["data_dir"] = str(tmp_path_factory.mktemp("data"))
  config["encoder"]["path"] = os.path.join(common.EMBEDDED_DIR, "encoder")
  config["llm"]["path"] = config["llm"]["tokenizer_path"] = os.path.join(common.EMBEDDED_DIR,
                                                                         "llm")
  (workdir / "config.json").write_text(json.dumps(config, indent=2))
  old_rows = [json.loads(l) for l in open(workdir / "decode" / "test.jsonl")]
  return workdir, old_rows


def test_a_workdir_trained_before_the_redesign_decodes_the_same(old_workdir):
  workdir, old_rows = old_workdir
  assert len({r["hypothesis"] for r in old_rows}) > 4      # transcripts that tell clips apart
  result = decode_cmd.decode(str(workdir))
  new_rows = [json.loads(l) for l in open(result["path"])]
  assert new_rows == old_rows
  assert result["step"] == 200 and result["num_examples"] == len(old_rows)


def test_decode_opens_only_what_it_needs(old_workdir, monkeypatch):
  """No optimizer state, no data-iterator restore, no pretrained weights read from their
  sources, no full-state restore, and features cached for the decoded split alone."""
  workdir, old_rows = old_workdir

  def forbidden(what):
    def fail(*args, **kwargs):
      raise AssertionError(f"decode must not {what}")
    return fail

  monkeypatch.setattr(state_lib, "create", forbidden("create a train state"))
  monkeypatch.setattr(pretrained, "load", forbidden("read pretrained weights"))
  monkeypatch.setattr(checkpoint.Checkpoints, "restore", forbidden("restore the whole state"))
  monkeypatch.setattr(checkpoint.Checkpoints, "restore_data",
                      forbidden("restore the data iterator"))
  inits = []
  real_layout = state_lib.layout

  def layout(*args, **kwargs):
    lay = real_layout(*args, **kwargs)
    tx = lay.tx
    counted = type(tx)(lambda params: inits.append(params) or tx.init(params), tx.update)
    return state_lib.StateLayout(**{**lay.__dict__, "tx": counted})

  monkeypatch.setattr(state_lib, "layout", layout)
  cached = []
  real_build = feature_cache.build_or_load
  monkeypatch.setattr(feature_cache, "build_or_load",
                      lambda directory, compute: cached.append(directory) or
                      real_build(directory, compute))
  result = decode_cmd.decode(str(workdir), split="validation")
  assert result["num_examples"] == 8
  assert inits == []                                          # no optimizer state made
  assert len(cached) == 1 and _split_of(cached[0]) == "validation"
  root = os.path.join(workdir_lib.load_config(str(workdir)).data.data_dir, "feature_cache")
  splits = sorted(_split_of(os.path.join(root, d)) for d in os.listdir(root))
  assert "validation" in splits and "train" not in splits, splits   # no train-split cache


def _split_of(cache_entry: str) -> str:
  """The split a feature-cache entry holds (synthetic clip ids start with it)."""
  with open(os.path.join(cache_entry, "records.json")) as f:
    return {i.split("/")[0] for i in json.load(f)["ids"]}.pop()


# --- peak memory of a decode ----------------------------------------------------

DECODE_AND_MEASURE = r"""
import json, sys
import jax
jax.devices()
from vsrllm_jax import decode
result = decode.decode(sys.argv[1])
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps(dict(peak=peak, clips=result["num_examples"])))
"""


def _run_with_llm(root, hidden: int, mlp: int) -> tuple[str, int]:
  """A trained-run workdir (random frozen LLM of 5 layers at this width); its LLM bytes."""
  config = tiny_config("mlp")
  config.data.data_dir = str(root.parent / "data")
  config.data.update(dict(max_frames=24, train_clips=8, validation_clips=4, test_clips=4,
                          max_instruction_tokens=12, max_label_tokens=8,
                          cache_features=False))
  config.llm.update(dict(vocab_size=0, hidden_dim=hidden, num_layers=5, num_heads=8,
                         num_kv_heads=4, head_dim=hidden // 8, mlp_dim=mlp))
  config.batch_size = config.eval_batch_size = 4
  config.decode.max_new_tokens = 8
  config.mesh.shape = (1, 1, 1)
  setup = setup_lib.make(config, devices=jax.devices()[:1])
  sources.data_source(setup.config.data, "test")            # the data set, prepared here
  layout = state_lib.layout(setup.model, setup.config, setup.mesh)
  state = state_lib.create(setup.model, setup.config, layout)
  workdir = str(root)
  workdir_lib.write_run_info(workdir, setup.config)
  ckpts = checkpoint.Checkpoints(workdir, 1)
  ckpts.save_best(1, state, 1.0)
  ckpts.close()
  return workdir, sum(x.nbytes for x in jax.tree.leaves(state.params["llm"]))


def _decode_peak(workdir) -> int:
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", DECODE_AND_MEASURE, workdir], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["clips"] == 4
  return out["peak"]


def test_decode_peak_memory_holds_one_copy_of_the_weights(tmp_path):
  """Decode's peak RSS grows by less than 1.5 x the LLM's bytes over the same decode of
  the same run with a tiny LLM (the process baseline: imports, data, compilation)."""
  big, big_bytes = _run_with_llm(tmp_path / "big", hidden=1024, mlp=2816)
  small, small_bytes = _run_with_llm(tmp_path / "small", hidden=64, mlp=176)
  assert 200e6 < big_bytes < 300e6 and small_bytes < 1e6
  growth = _decode_peak(big) - _decode_peak(small)
  assert growth < 1.5 * big_bytes, (growth / 1e6, big_bytes / 1e6)
