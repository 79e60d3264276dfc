r"""Host memory of loading a Hugging Face LLM checkpoint, host mode and mesh mode.

  python benchmarks/load_memory.py            # ~300 MB fp32 random Llama

Writes a random transformers Llama to a temp dir, then loads it in a fresh
subprocess per mode and prints one JSON line each: peak RSS above the baseline
(taken after imports, jax init on 8 simulated CPU devices and tracing the
model's shapes) divided by the checkpoint size (goal <= 1.3), and in mesh mode
(fsdp=8 with the default sharding rules) the bytes each device holds against
size / 8. On CPU the "devices" live in host memory, so mesh mode's RSS
includes the loaded params themselves, as host mode's does.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _status_kb(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
  """Resets VmHWM to the current RSS (Linux >= 4.0); False if not allowed."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def child(path: str, mode: str) -> None:
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, ROOT)
  import jax  # pylint: disable=g-import-not-at-top
  from vsrllm_jax import sharding  # pylint: disable=g-import-not-at-top
  from vsrllm_jax.formats import hf_llm  # pylint: disable=g-import-not-at-top
  from vsrllm_jax.models import llm  # pylint: disable=g-import-not-at-top

  mesh = sharding.make_mesh((1, 8, 1)) if mode == "mesh" else None
  rules = sharding.PRESETS["fsdp_tp"]
  with open(os.path.join(path, "config.json")) as f:
    config = llm.LlmConfig.from_hf_config(json.load(f))
  hf_llm.param_shapes(config, boxed=True)
  jax.block_until_ready(jax.device_put(0.0))
  reset = _reset_peak()
  base_rss = _status_kb("VmRSS")
  base_hwm = _status_kb("VmHWM")
  t = time.perf_counter()
  _, params = hf_llm.from_pretrained(path, mesh=mesh, rules=rules)
  jax.block_until_ready(params)
  load_s = time.perf_counter() - t
  peak_kb = _status_kb("VmHWM") - (base_rss if reset else base_hwm)
  files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
  size = sum(os.path.getsize(os.path.join(path, f)) for f in files)
  leaves = jax.tree.leaves(params)
  param_bytes = sum(x.nbytes for x in leaves)
  out = {"mode": mode, "checkpoint_mb": round(size / 2**20, 1), "files": len(files),
         "param_mb": round(param_bytes / 2**20, 1), "load_s": round(load_s, 2),
         "peak_rss_over_baseline_mb": round(peak_kb / 1024, 1),
         "peak_over_checkpoint": round(peak_kb * 1024 / size, 3),
         "final_rss_over_baseline_mb": round((_status_kb("VmRSS") - base_rss) / 1024, 1),
         "peak_was_reset": reset}
  if mode == "mesh":
    per_device = {}
    for x in leaves:
      for shard in x.addressable_shards:
        per_device[shard.device.id] = per_device.get(shard.device.id, 0) + shard.data.nbytes
    out.update(devices=len(per_device),
               max_device_mb=round(max(per_device.values()) / 2**20, 2),
               min_device_mb=round(min(per_device.values()) / 2**20, 2),
               param_mb_over_8=round(param_bytes / 8 / 2**20, 2),
               max_device_over_ideal=round(max(per_device.values()) / (param_bytes / 8), 3))
  print(json.dumps(out), flush=True)


def write_checkpoint(path: str, args) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  transformers.utils.logging.disable_progress_bar()
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(
      vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
      num_hidden_layers=args.layers, num_attention_heads=args.heads,
      num_key_value_heads=args.kv_heads, max_position_embeddings=1024)
  with torch.device("cpu"):
    model = transformers.LlamaForCausalLM(cfg).to(torch.float32)
  model.save_pretrained(path, max_shard_size=args.max_shard_size)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--child", choices=("host", "mesh"), help=argparse.SUPPRESS)
  p.add_argument("--path", help="an existing checkpoint dir (default: write a random one)")
  p.add_argument("--vocab", type=int, default=32000)
  p.add_argument("--hidden", type=int, default=768)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--heads", type=int, default=12)
  p.add_argument("--kv_heads", type=int, default=4)
  p.add_argument("--ffn", type=int, default=2048)
  p.add_argument("--max_shard_size", default="100MB", help="transformers save_pretrained shards")
  args = p.parse_args()
  if args.child:
    child(args.path, args.child)
    return
  with tempfile.TemporaryDirectory() as tmp:
    path = args.path or tmp
    if not args.path:
      write_checkpoint(path, args)
    for mode in ("host", "mesh"):
      subprocess.run([sys.executable, os.path.abspath(__file__), "--child", mode, "--path", path],
                     check=True)


if __name__ == "__main__":
  main()
