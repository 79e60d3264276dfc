"""The README's main command at a reduced budget: the embedded encoder and LLM,
cached features, a frozen encoder and LLM, and a WER that only a pretrained
pair reaches (a random LLM of the same shape scores about 1.0 at this budget).

The full run and its 3-seed ablation are in the README, with their commands.
"""
import json
import math
import os
import re
import subprocess
import sys

from vsrllm_jax.configs import common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Measured (seed 0, 2-core CPU): test WER 0.281 on 32 unseen-speaker clips.
MAX_REDUCED_WER = 0.45
REDUCED = ["--config.total_steps=300", "--config.data.train_clips=160",
           "--config.data.validation_clips=32", "--config.data.test_clips=32",
           "--config.eval_every=300", "--config.checkpoint_every=300", "--config.log_every=100"]


def readme_main_config() -> str:
  with open(os.path.join(REPO, "README.md")) as f:
    quick_start = f.read().split("## Quick start", 1)[1].split("##", 1)[0]
  return re.search(r"python -m vsrllm_jax\.train --config=(\S+)", quick_start).group(1)


def test_readme_main_command_at_a_reduced_budget(tmp_path):
  config_file = readme_main_config()
  workdir, data_dir = tmp_path / "run", tmp_path / "data"
  env = dict(os.environ, VSRLLM_DATA_DIR=str(data_dir), JAX_PLATFORMS="cpu", XLA_FLAGS="")
  proc = subprocess.run([sys.executable, "-m", "vsrllm_jax.train", f"--config={config_file}",
                         f"--workdir={workdir}", *REDUCED], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]

  config = json.loads((workdir / "config.json").read_text())
  assert config["encoder"]["path"] == os.path.join(common.EMBEDDED_DIR, "encoder")
  assert config["llm"]["path"] == os.path.join(common.EMBEDDED_DIR, "llm")
  assert config["data"]["cache_features"]
  assert config["optim"]["param_groups"] == [["^(projector|ctc_head)/", "main"],
                                             ["/lora_[ab]$", "main"], [".*", None]]
  assert not config["llm"]["lora"]["enabled"]
  assert len(os.listdir(data_dir / "feature_cache")) == 3     # features cached once per split

  final = [json.loads(l) for l in open(workdir / "metrics.jsonl") if '"test/wer"' in l][-1]
  assert final["test/wer"] <= MAX_REDUCED_WER, final
  # The synthetic GRID set: slot accuracies, next to both WERs (ours and VSP-LLM's).
  assert {f"test/slot_accuracy/{s}" for s in ("command", "letter", "digit")} <= set(final)
  assert all(0.0 <= v <= 1.0 for k, v in final.items() if "slot_accuracy" in k)
  assert math.isfinite(final["test/wer_plain"]) and final["test/wer_plain"] >= 0, final
