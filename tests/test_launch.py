"""The launch scripts and the Colab notebook, checked on this CPU machine.

The scripts run in their dry-run mode and once for real against stand-ins
(a `gcloud` and a `python` that record their arguments): the gcloud commands,
the environment for jax.distributed and the train command they produce. The
notebook runs end to end with only its TPU cell skipped, at a reduced budget.
"""
import json
import math
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import textwrap

from packaging.utils import canonicalize_name
import pytest

from tests.helpers import light_env
from tests.test_default_run import readme_main_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")
NOTEBOOK = os.path.join(REPO, "notebooks", "colab_tpu.ipynb")
# test_default_run.py's knobs, smaller still: this run only has to finish and score.
NOTEBOOK_STEPS = 30
NOTEBOOK_TEST_CLIPS = 16
REDUCED = ["--config.data.train_clips=64", "--config.data.validation_clips=16",
           f"--config.data.test_clips={NOTEBOOK_TEST_CLIPS}", "--config.eval_every=30",
           "--config.checkpoint_every=30", "--config.log_every=10"]
TRAIN = ["python", "-m", "vsrllm_jax.train"]


def _write_executable(path, text):
  with open(path, "w") as f:
    f.write(text)
  os.chmod(path, 0o755)


@pytest.fixture(scope="module")
def fake_bin(tmp_path_factory):
  """A `gcloud` that appends its argv as one JSON line to $GCLOUD_LOG and succeeds."""
  bin_dir = tmp_path_factory.mktemp("bin")
  _write_executable(bin_dir / "gcloud", f"#!{sys.executable}\n" + textwrap.dedent("""\
      import json, os, sys
      with open(os.environ["GCLOUD_LOG"], "a") as f:
        f.write(json.dumps(sys.argv[1:]) + "\\n")
      """))
  return bin_dir


def run_script(name, *args, env=None, path=None, check=True):
  """Runs launch/NAME in a clean environment (no SLURM_*, TPU_* ... from this machine)."""
  base = {"PATH": path or os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"),
          "LANG": "C.UTF-8"}
  proc = subprocess.run(["bash", os.path.join(LAUNCH, name), *args],
                        env={**base, **(env or {})}, capture_output=True, text=True, timeout=120)
  if check:
    assert proc.returncode == 0, proc.stderr
  return proc


@pytest.fixture
def tpu(fake_bin, tmp_path):
  """launch/tpu_vm.sh with the recording gcloud first on PATH; returns (run, gcloud_calls)."""
  log = tmp_path / "gcloud.jsonl"
  base = {"TPU_NAME": "vsr-test", "ZONE": "europe-west4-a", "GCLOUD_LOG": str(log),
          "TMPDIR": str(tmp_path)}

  def run(*args, check=True, **env):
    return run_script("tpu_vm.sh", *args, env={**base, **env}, check=check,
                      path=f"{fake_bin}:{os.environ['PATH']}")

  def calls():
    return [json.loads(l) for l in log.read_text().splitlines()] if log.exists() else []
  return run, calls


def printed_gcloud(stdout):
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ gcloud ")]


def remote_command(argv):
  """The --command of a `gcloud compute tpus tpu-vm ssh` argv, checked for bash syntax."""
  assert argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"], argv
  assert "--worker=all" in argv, argv
  [command] = [a.split("=", 1)[1] for a in argv if a.startswith("--command=")]
  syntax = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
  assert syntax.returncode == 0, (command, syntax.stderr)
  return command


@pytest.mark.parametrize("name", ["common.sh", "tpu_vm.sh", "gpu_multinode.sh"])
def test_script_syntax(name):
  proc = subprocess.run(["bash", "-n", os.path.join(LAUNCH, name)], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("accelerator,runtime,hosts", [
    ("v4-8", "tpu-ubuntu2204-base", 1), ("v4-32", "tpu-ubuntu2204-base", 4),
    ("v5litepod-8", "v2-alpha-tpuv5-lite", 1), ("v5litepod-16", "v2-alpha-tpuv5-lite", 4),
    ("v5p-16", "v2-alpha-tpuv5", 2), ("v6e-8", "v2-alpha-tpuv6e", 1),
    ("v6e-32", "v2-alpha-tpuv6e", 8)])
def test_tpu_create_and_train(tpu, accelerator, runtime, hosts):
  run, calls = tpu
  create = printed_gcloud(run("--dry-run", "create", ACCELERATOR_TYPE=accelerator).stdout)
  assert create == [["gcloud", "compute", "tpus", "tpu-vm", "create", "vsr-test",
                     "--zone=europe-west4-a", f"--accelerator-type={accelerator}",
                     f"--version={runtime}"]]

  out = run("train", "--config.total_steps=50", DRY_RUN="1", ACCELERATOR_TYPE=accelerator,
            WORKDIR="/mnt/shared/run dir", VSRLLM_DATA_DIR="/mnt/shared/data").stdout
  [ssh] = printed_gcloud(out)
  steps = remote_command(ssh).split("; ")
  assert steps[:3] == ["set -e", "cd vsrllm_jax", ". .venv/bin/activate"]
  assert steps[3] == "export VSRLLM_DATA_DIR=/mnt/shared/data"
  assert shlex.split(steps[4]) == TRAIN + [
      "--config=configs/conv_abstractor.py", "--workdir=/mnt/shared/run dir",
      *(["--distributed"] if hosts > 1 else []), "--config.total_steps=50"]
  assert calls() == []          # a dry run never calls gcloud


def test_tpu_setup_from_a_clone_installs_the_tpu_extra_at_the_pins(tpu):
  run, calls = tpu
  out = run("--dry-run", "setup", REPO_URL="https://example.com/vsr.git", GIT_REF="v1",
            TORCH_INDEX_URL="https://download.pytorch.org/whl/cpu").stdout
  clone, install = [remote_command(argv) for argv in printed_gcloud(out)]
  assert "git clone -q https://example.com/vsr.git vsrllm_jax" in clone
  assert "git -C vsrllm_jax fetch -q origin v1 && git -C vsrllm_jax checkout -q FETCH_HEAD" in clone
  steps = install.split("; ")
  pips = [shlex.split(step) for step in steps if step.startswith("pip ")]
  # One step: the light set and jax[tpu], requirements.txt as constraints (jax at its pin).
  assert pips == [["pip", "install", "-q", "-U", "pip"],
                  ["pip", "install", "-q", "-e", ".[tpu]", "-c", "requirements.txt"]], steps
  activate = steps.index(". .venv/bin/activate")
  [extra] = [i for i, step in enumerate(steps) if ".[tpu]" in step]
  assert activate < extra and steps[extra + 1].startswith("python -c "), steps  # then versions
  assert "-r requirements.txt" not in install and "torch" not in install, install
  assert "--extra-index-url" not in install and "jax[tpu]==" not in install, install
  for name in ("tpu_vm.sh", "common.sh", "README.md"):   # no torch on TPU VMs: no torch index
    with open(os.path.join(LAUNCH, name)) as f:
      assert "TORCH_INDEX_URL" not in f.read(), name
  assert calls() == []


def test_tpu_setup_copies_this_checkout(tpu, tmp_path):
  """The real (non-dry) path: a tarball of the checkout, then the same gcloud calls."""
  run, calls = tpu
  dry = printed_gcloud(run("setup", DRY_RUN="1", PROJECT="p1").stdout)
  run("setup", PROJECT="p1")
  assert [["gcloud"] + c for c in calls()] == dry
  scp = calls()[0]
  tarball = str(tmp_path / "vsrllm_jax_src.tgz")
  assert scp == ["compute", "tpus", "tpu-vm", "scp", tarball, "vsr-test:vsrllm_jax_src.tgz",
                 "--zone=europe-west4-a", "--project=p1", "--worker=all"]
  assert all("--worker=all" in c and "--project=p1" in c for c in calls())
  with tarfile.open(tarball) as tar:
    names = set(tar.getnames())
  assert {"pyproject.toml", "requirements.txt", "vsrllm_jax/train.py", "launch/tpu_vm.sh",
          "vsrllm_jax/embedded/llm/model.safetensors"} <= names
  assert not [n for n in names if n.startswith((".venv/", ".git/")) or "__pycache__" in n]
  unpack = remote_command(["gcloud"] + calls()[1])
  assert "tar xzf vsrllm_jax_src.tgz -C vsrllm_jax" in unpack


def test_tpu_delete(tpu):
  run, calls = tpu
  run("delete")
  assert calls() == [["compute", "tpus", "tpu-vm", "delete", "vsr-test", "--zone=europe-west4-a",
                      "--quiet"]]


@pytest.mark.parametrize("args,env,message", [
    (["train"], {}, "WORKDIR is not set"),
    (["train"], {"ACCELERATOR_TYPE": "v4-16", "WORKDIR": "/mnt/run"},
     "a 2-host slice needs VSRLLM_DATA_DIR"),
    (["create"], {"ACCELERATOR_TYPE": "v9-8"}, "set RUNTIME_VERSION"),
    (["setup", "--config.seed=1"], {}, "'setup' takes no extra arguments"),
    (["start"], {}, "unknown subcommand 'start'"),
    (["train"], {"WORKDIR": "/mnt/run", "DISTRIBUTED": "yes"}, "DISTRIBUTED must be auto, 0 or 1"),
])
def test_tpu_errors_name_the_problem(tpu, args, env, message):
  run, calls = tpu
  proc = run(*args, check=False, **env)
  assert proc.returncode == 2 and message in proc.stderr, proc.stderr
  assert calls() == []


def test_tpu_pod_with_data_dir_in_the_config(tpu):
  run, _ = tpu
  out = run("--dry-run", "train", "--config.data.data_dir=/mnt/shared/data",
            ACCELERATOR_TYPE="v4-16", WORKDIR="/mnt/run").stdout
  train = shlex.split(remote_command(printed_gcloud(out)[0]).split("; ")[-1])
  assert train[-2:] == ["--distributed", "--config.data.data_dir=/mnt/shared/data"]


# --- gpu_multinode.sh ------------------------------------------------------------------------


@pytest.fixture
def gpu(tmp_path):
  """launch/gpu_multinode.sh with PYTHON = a stand-in that records argv, cwd and JAX_* env."""
  record = tmp_path / "python_call.json"
  stub = tmp_path / "python"
  _write_executable(stub, f"#!{sys.executable}\n" + textwrap.dedent("""\
      import json, os, sys
      env = {k: v for k, v in os.environ.items() if k.startswith("JAX_")}
      with open(os.environ["RECORD"], "w") as f:
        json.dump(dict(argv=sys.argv[1:], cwd=os.getcwd(), env=env), f)
      """))

  def run(*args, check=True, path=None, **env):
    return run_script("gpu_multinode.sh", *args, check=check, path=path,
                      env={"PYTHON": str(stub), "RECORD": str(record), **env})

  def recorded():
    return json.loads(record.read_text()) if record.exists() else None
  return run, recorded


def dry_run_env_and_command(stdout):
  lines = stdout.splitlines()
  env = dict(l[len("export "):].split("=", 1) for l in lines if l.startswith("export "))
  return env, shlex.split(lines[-1][2:])


def test_gpu_explicit_env(gpu):
  run, recorded = gpu
  env = dict(COORDINATOR_ADDRESS="10.0.0.1:8476", NUM_PROCESSES="2", PROCESS_ID="1",
             WORKDIR="/shared/run", VSRLLM_DATA_DIR="/shared/data")
  exported, command = dry_run_env_and_command(run("--config.total_steps=5", DRY_RUN="1",
                                                  **env).stdout)
  expected_env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:8476", "JAX_NUM_PROCESSES": "2",
                  "JAX_PROCESS_ID": "1"}
  assert exported == {**expected_env, "VSRLLM_DATA_DIR": "/shared/data"}
  args = ["-m", "vsrllm_jax.train", "--config=configs/conv_abstractor.py",
          "--workdir=/shared/run", "--distributed", "--config.total_steps=5"]
  assert command[1:] == args
  assert recorded() is None     # the dry run did not start Python

  run("--config.total_steps=5", **env)
  assert recorded() == dict(argv=args, cwd=REPO, env=expected_env)


@pytest.mark.parametrize("nodelist,first", [
    ("gpu[017-020]", "gpu017"), ("gpu017,gpu018", "gpu017"),
    ("gpu[017,019-020],cpu1", "gpu017"), ("a100n3", "a100n3")])
def test_gpu_from_slurm_without_scontrol(gpu, nodelist, first):
  run, _ = gpu
  path = "/usr/bin:/bin"
  if shutil.which("scontrol", path=path):
    pytest.skip("scontrol is installed here; this case covers its absence")
  slurm = dict(SLURM_NTASKS="4", SLURM_NNODES="4", SLURM_PROCID="3", SLURM_JOB_ID="1234",
               SLURM_JOB_NODELIST=nodelist, WORKDIR="/shared/run")
  exported, command = dry_run_env_and_command(run(DRY_RUN="1", path=path, **slurm).stdout)
  assert exported == {"JAX_COORDINATOR_ADDRESS": f"{first}:{61440 + 1234 % 4096}",
                      "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
  assert "--distributed" in command


def test_gpu_from_slurm_with_scontrol_and_overrides(gpu, tmp_path):
  run, _ = gpu
  bin_dir = tmp_path / "slurm_bin"
  bin_dir.mkdir()
  _write_executable(bin_dir / "scontrol",
                    '#!/bin/bash\n[ "$1 $2" = "show hostnames" ] && printf "nodeA\\nnodeB\\n"\n')
  slurm = dict(SLURM_NTASKS="2", SLURM_NNODES="2", SLURM_PROCID="0", SLURM_JOB_ID="7",
               SLURM_JOB_NODELIST="weird[1-2]", WORKDIR="/shared/run")
  path = f"{bin_dir}:{os.environ['PATH']}"
  exported, _ = dry_run_env_and_command(run(DRY_RUN="1", path=path, COORDINATOR_PORT="9999",
                                            **slurm).stdout)
  assert exported["JAX_COORDINATOR_ADDRESS"] == "nodeA:9999"
  exported, _ = dry_run_env_and_command(run(DRY_RUN="1", path=path, PROCESS_ID="1",
                                            COORDINATOR_ADDRESS="10.1.1.1:1234", **slurm).stdout)
  assert exported == {"JAX_COORDINATOR_ADDRESS": "10.1.1.1:1234", "JAX_NUM_PROCESSES": "2",
                      "JAX_PROCESS_ID": "1"}


@pytest.mark.parametrize("env,message", [
    ({}, "missing COORDINATOR_ADDRESS NUM_PROCESSES PROCESS_ID WORKDIR:"),
    ({"NUM_PROCESSES": "2", "WORKDIR": "/x"}, "missing COORDINATOR_ADDRESS PROCESS_ID:"),
    ({"COORDINATOR_ADDRESS": "h:1", "NUM_PROCESSES": "2", "PROCESS_ID": "2", "WORKDIR": "/x"},
     "PROCESS_ID=2 is not below NUM_PROCESSES=2"),
    ({"COORDINATOR_ADDRESS": "h:1", "NUM_PROCESSES": "two", "PROCESS_ID": "0", "WORKDIR": "/x"},
     "NUM_PROCESSES must be a non-negative integer, got 'two'"),
    ({"COORDINATOR_ADDRESS": "10.0.0.1", "NUM_PROCESSES": "2", "PROCESS_ID": "0", "WORKDIR": "/x"},
     "COORDINATOR_ADDRESS must be host:port, got '10.0.0.1'"),
    ({"SLURM_NTASKS": "8", "SLURM_NNODES": "2", "SLURM_PROCID": "5", "SLURM_JOB_ID": "1",
      "SLURM_JOB_NODELIST": "n[1-2]", "WORKDIR": "/x"}, "run one task per node"),
])
def test_gpu_errors_name_the_problem(gpu, env, message):
  run, recorded = gpu
  proc = run(check=False, **env)
  assert proc.returncode == 2 and message in proc.stderr, proc.stderr
  assert recorded() is None


# --- notebooks/colab_tpu.ipynb ----------------------------------------------------------------


def load_notebook():
  with open(NOTEBOOK) as f:
    return json.load(f)


def tags(cell):
  return cell.get("metadata", {}).get("tags", [])


def cell_tagged(nb, tag):
  [cell] = [c for c in nb["cells"] if tag in tags(c)]
  return cell


_MAGIC = re.compile(r"^(\s*)([!%])(.*)$")


def python_of(source: str) -> str:
  """IPython lines as Python: `!cmd {x}` -> _sh(f"cmd {x}"), `%cd`/`%pip` -> _cd/_pip."""
  out = []
  for line in source.splitlines():
    m = _MAGIC.match(line)
    if not m:
      out.append(line)
      continue
    indent, kind, rest = m.groups()
    if kind == "!":
      out.append(f"{indent}_sh(f{rest!r})")
      continue
    name, _, arg = rest.partition(" ")
    if name not in ("cd", "pip"):
      raise AssertionError(f"the notebook uses %{name}; this test runs only !, %cd and %pip")
    out.append(f"{indent}_{name}(f{arg!r})")
  return "\n".join(out)


RUN_PRELUDE = f'''\
import os, pathlib, re, shlex, subprocess, sys
sys.path.insert(0, {REPO!r})
from tests.helpers import light_env


def _sh(cmd):
  print("!" + cmd, flush=True)
  subprocess.run(cmd, shell=True, check=True, executable="/bin/bash")


def _cd(path):
  os.chdir(path)
  print("%cd " + os.getcwd(), flush=True)


def _pip(args):
  # No network in tests: `install [-q] -e SPEC -c FILE` passes when this environment already
  # holds what it would install (the closure of pyproject's requirements for SPEC's extras,
  # in their ranges), each name that FILE pins at its pin.
  match = re.fullmatch(r"install (?:-q )?-e (.+?)(?:\\[([\\w,-]+)\\])? -c (\\S+)",
                       " ".join(shlex.split(args)))
  if not match:
    raise AssertionError(f"%pip {{args}}: this test runs only 'install [-q] -e SPEC -c FILE'")
  root, extras, constraints = match.groups()
  dists = light_env.closure(light_env.declared(*filter(None, (extras or "").split(",")),
                                               root=pathlib.Path(root)))
  pinned = light_env.check_pins(dists, pathlib.Path(constraints))
  print(f"%pip {{args}}: {{len(dists)}} distributions already here, {{pinned}} at the pins of "
        f"{{os.path.abspath(constraints)}}", flush=True)
'''


def notebook_script(nb, overrides: dict, skip_tag="tpu-runtime") -> str:
  """The code cells in order as one script, the overrides injected after the parameters cell."""
  parts = [RUN_PRELUDE]
  for cell in nb["cells"]:
    if cell["cell_type"] != "code" or skip_tag in tags(cell):
      continue
    parts.append(f"# --- cell {cell['id']}\n" + python_of("".join(cell["source"])))
    if "parameters" in tags(cell):
      parts.append("# --- injected parameters\n" +
                   "\n".join(f"{k} = {v!r}" for k, v in overrides.items()))
  return "\n\n".join(parts) + "\n"


def _cell_env():
  """What a notebook's `!python` sees: this interpreter first on PATH, CPU, one device."""
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="",
              PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")


def test_notebook_layout():
  nb = load_notebook()
  assert nb["nbformat"] == 4 and nb["cells"][0]["cell_type"] == "markdown"
  assert len({c["id"] for c in nb["cells"]}) == len(nb["cells"])
  order = [c["id"] for c in nb["cells"]]
  ids = {tag: cell_tagged(nb, tag)["id"] for tag in ("parameters", "clone", "tpu-runtime")}
  # parameters, then the code and the light install, then the tpu extra (jax[tpu] at the pin)
  assert order.index(ids["parameters"]) < order.index(ids["clone"]) < order.index(
      ids["tpu-runtime"])
  pips = {tag: [shlex.split(line.split("%pip", 1)[1])
                for line in "".join(cell_tagged(nb, tag)["source"]).splitlines()
                if line.lstrip().startswith("%pip")]
          for tag in ("clone", "tpu-runtime")}
  assert pips == {"clone": [["install", "-q", "-e", ".", "-c", "requirements.txt"]],
                  "tpu-runtime": [["install", "-q", "-e", ".[tpu]", "-c", "requirements.txt"]]}
  installs = [line for c in nb["cells"] for line in "".join(c["source"]).splitlines()
              if "pip install" in line and c["cell_type"] == "code"]
  assert len(installs) == 2, installs
  params = {}
  exec("".join(cell_tagged(nb, "parameters")["source"]), params)  # pylint: disable=exec-used
  assert params["STEPS"] == 2000 and params["CONFIG"] == readme_main_config()
  assert params["WORKDIR"] == "/content/vsr_run" and params["EXTRA_ARGS"] == ""
  assert {"REPO_URL", "REPO_DIR", "DATA_DIR"} <= set(params)


def test_notebook_tpu_cell_installs_the_tpu_extra_at_the_pins_and_refuses_cpu(tmp_path):
  nb = load_notebook()
  record = tmp_path / "calls.json"
  script = textwrap.dedent('''\
      import json, os, subprocess
      calls = []
      def _pip(args):
        calls.append(["pip", args])
      def _sh(cmd):
        p = subprocess.run(cmd, shell=True, capture_output=True, text=True, executable="/bin/bash")
        calls.append(["sh", cmd, p.returncode, p.stdout + p.stderr])
      ''') + python_of("".join(cell_tagged(nb, "tpu-runtime")["source"])) + textwrap.dedent(f'''
      with open({str(record)!r}, "w") as f:
        json.dump(calls, f)
      ''')
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=_cell_env(),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  [pip], [check] = [[c for c in json.loads(record.read_text()) if c[0] == kind]
                    for kind in ("pip", "sh")]
  assert shlex.split(pip[1]) == ["install", "-q", "-e", ".[tpu]", "-c", "requirements.txt"]
  assert check[2] != 0 and "no TPU" in check[3], check   # on CPU the device check fails


def test_notebook_runs_on_cpu(tmp_path):
  """Every code cell but the TPU one, papermill-style overrides: a short default run."""
  nb = load_notebook()
  workdir, data_dir = tmp_path / "run", tmp_path / "data"
  overrides = dict(REPO_URL="", REPO_DIR=REPO, STEPS=NOTEBOOK_STEPS, WORKDIR=str(workdir),
                   DATA_DIR=str(data_dir), EXTRA_ARGS=" ".join(REDUCED))
  params = {}
  exec("".join(cell_tagged(nb, "parameters")["source"]), params)  # pylint: disable=exec-used
  assert set(overrides) <= set(params), "every override must be a notebook parameter"
  script = tmp_path / "notebook.py"
  script.write_text(notebook_script(nb, overrides))
  proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=_cell_env(),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
  out = proc.stdout

  assert "git clone" not in out and f"%cd {REPO}\n" in out      # the checkout was used as is
  # The light install (the closure of the base dependencies), at requirements.txt's pins.
  light = light_env.closure(light_env.declared())
  pinned = light_env.check_pins(light, pathlib.Path(REPO) / "requirements.txt")
  with open(os.path.join(REPO, "requirements.txt")) as f:
    pins = {canonicalize_name(n) for n in re.findall(r"^([A-Za-z0-9_.-]+)==", f.read(), re.M)}
  assert {canonicalize_name(r.name) for r in light_env.declared()} <= pins   # pins cover it
  assert (f"%pip install -q -e . -c requirements.txt: {len(light)} distributions already here, "
          f"{pinned} at the pins of {os.path.join(REPO, 'requirements.txt')}\n") in out
  with open(workdir / "metrics.jsonl") as f:
    rows = [json.loads(l) for l in f if l.strip()]
  final = [r for r in rows if "test/wer" in r][-1]
  assert final["step"] == NOTEBOOK_STEPS and math.isfinite(final["test/wer"]), final
  assert f"test WER {final['test/wer']:.4f}, test CER {final['test/cer']:.4f}" in out
  assert os.listdir(data_dir / "feature_cache")                  # DATA_DIR reached the run
  with open(workdir / "decode" / "test.jsonl") as f:
    assert len(f.readlines()) == NOTEBOOK_TEST_CLIPS
