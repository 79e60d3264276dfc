"""The default install is light and the wheel works on its own.

The wheel is built from the checkout and installed with ``pip install --no-deps``
into a fresh venv that holds only the closure of pyproject's dependencies
(``tests/helpers/light_env.py``: linked from this environment, so nothing is
downloaded). From a directory outside the checkout it runs the README's main
command, with a packaged config, at a tiny budget; TensorFlow and torch are not
importable there, and the TensorBoard event file is read back (with tensorboard's
reader, from the dev extra).
"""
import json
import os
import pathlib
import re
import subprocess
import zipfile

import pytest

from tests.helpers import light_env

README = light_env.REPO_ROOT / "README.md"
NOTEBOOK = light_env.REPO_ROOT / "notebooks" / "colab_tpu.ipynb"
TINY = ["--config.total_steps=4", "--config.data.train_clips=16",
        "--config.data.validation_clips=8", "--config.data.test_clips=8",
        "--config.eval_every=4", "--config.checkpoint_every=4", "--config.log_every=2",
        "--config.profile_steps=(1,1)"]   # the profiler hook needs no TF either


def _heavy(names) -> set[str]:
  """TensorFlow and Keras distributions among ``names`` (tensorflow-datasets and its
  tensorflow-metadata are pure Python and TF-free)."""
  names = {n.lower().replace("_", "-") for n in names}
  return {n for n in names if n.startswith(("tensorflow", "tf-", "tf-keras", "keras"))
          and n not in ("tensorflow-datasets", "tensorflow-metadata")}


def test_the_default_install_has_neither_tensorflow_nor_torch():
  names = set(light_env.closure(light_env.declared()))
  assert "jax" in names and "tensorboardx" in names and "clu" in names
  assert not _heavy(names) and not {n for n in names if n.startswith(("torch", "nvidia"))}
  assert "torch" in set(light_env.closure(light_env.declared("torch")))


def _install_targets(args: str) -> list[str]:
  """The package specs (``.``, ``.[tpu]``) of a ``pip install`` line's arguments."""
  return re.findall(r"""(?:^|\s)["']?(\.(?:\[[a-z0-9,]+\])?)["']?(?=\s|$)""", args)


def test_readme_installs_the_package_light_and_tests_with_the_pinned_set():
  installs = re.findall(r"^\s*pip install (.*?)(?:\s+#.*)?$", README.read_text(), re.M)
  assert any(_install_targets(a) == ["."] for a in installs), installs      # the light set
  assert any(_install_targets(a) == [".[torch]"] and "download.pytorch.org/whl/cpu" in a
             for a in installs), installs
  assert "-r requirements.txt" in installs, installs                         # tests / CI
  pinned = re.findall(r"^([A-Za-z0-9_.-]+)==", (light_env.REPO_ROOT / "requirements.txt").read_text(),
                      re.M)
  assert not _heavy(pinned), _heavy(pinned)       # the test set has no TensorFlow either


def test_notebook_installs_the_light_set():
  cells = ["".join(c["source"]) for c in json.loads(NOTEBOOK.read_text())["cells"]
           if c["cell_type"] == "code"]
  installs = [line.split("pip install", 1)[1] for cell in cells for line in cell.splitlines()
              if "pip install" in line]
  assert installs, "the notebook installs nothing"
  for args in installs:
    assert "-r " not in args and not re.search(r"tensorflow|torch", args), args
    assert _install_targets(args) in ([".[tpu]"], ["."]), args


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
  return light_env.build_wheel(tmp_path_factory.mktemp("wheel"))


def test_the_wheel_carries_the_embedded_models_and_configs(wheel):
  names = set(zipfile.ZipFile(wheel).namelist())
  assert {"vsrllm_jax/embedded/llm/model.safetensors", "vsrllm_jax/embedded/encoder/config.json",
          "vsrllm_jax/embedded/llm/tokenizer.json", "vsrllm_jax/configs/conv_abstractor.py",
          "vsrllm_jax/configs/common.py"} <= names
  assert not any(n.startswith(("configs/", "tests/", "benchmarks/")) for n in names)
  requires = [l for l in zipfile.ZipFile(wheel).read(
      next(n for n in names if n.endswith(".dist-info/METADATA"))).decode().splitlines()
      if l.startswith("Requires-Dist:")]
  assert any("tensorboardx" in l.lower() for l in requires)
  assert not any("tensorflow" in l.lower() and "datasets" not in l.lower() for l in requires
                 if "extra ==" not in l)


def test_installed_wheel_runs_the_main_command_without_tensorflow(wheel, tmp_path):
  python = light_env.create(tmp_path / "venv", light_env.declared())
  light_env.install_wheel(python, wheel)
  outside = tmp_path / "elsewhere"
  outside.mkdir()
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env.update(VSRLLM_DATA_DIR=str(tmp_path / "data"), JAX_PLATFORMS="cpu", XLA_FLAGS="")

  probe = subprocess.run(
      [python, "-c", "import importlib.util as u, vsrllm_jax; "
       "print(vsrllm_jax.__file__); print(u.find_spec('tensorflow'), u.find_spec('torch'))"],
      cwd=outside, env=env, capture_output=True, text=True, check=True).stdout.splitlines()
  assert probe[0].startswith(str(tmp_path / "venv")), probe   # the wheel, not the checkout
  assert probe[1] == "None None", probe

  workdir = tmp_path / "run"
  proc = subprocess.run([python, "-m", "vsrllm_jax.train", "--config=conv_abstractor",
                         f"--workdir={workdir}", *TINY], cwd=outside, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  assert {"train/loss", "val/wer", "test/wer"} <= set().union(*records)
  assert list((workdir / "profile").rglob("*.xplane.pb")), "no profiler trace written"

  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  events = event_accumulator.EventAccumulator(str(workdir / "tensorboard"))
  events.Reload()
  losses = events.Scalars("train/loss")
  assert [e.step for e in losses] == [2, 4]
  logged = {r["step"]: r["train/loss"] for r in records if "train/loss" in r}
  for e in losses:
    assert abs(e.value - logged[e.step]) <= 1e-6 * max(1.0, abs(logged[e.step]))
