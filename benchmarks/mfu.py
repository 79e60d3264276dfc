r"""MFU and memory of the projector train step at real LLM shapes (GPU/TPU; CPU compile-only).

  python benchmarks/mfu.py --shape=1b --batch=16 --seq=1024            # time it, MFU/HFU
  python benchmarks/mfu.py --shape=8b --batch=8 --seq=1024 --compile_only --devices=8
                                                                       # memory_analysis only

The step is the real one (``training.step.make_train_step``): cached AV-HuBERT
Large features (1024-d, one visual token per frame through the ``mlp``
projector) -> frozen Llama of the named shape, random-initialised, bf16 compute,
frozen params stored bf16, the projector and its AdamW state fp32.
Sequence = 16 instruction + (seq - 48) visual + 32 label tokens.

MFU = analytic model FLOPs (``vsrllm_jax.throughput``: frozen LLM 2N forward +
2N activation-gradient per token + attention + LM head at label positions,
projector 3x forward) / step time / peak; HFU = XLA's count of the lowered
step with layer scans unrolled / step time / peak. Peak: the chip's dense bf16
figure (989 TFLOP/s for H100 SXM and H200).
``--compile_only`` builds the state abstractly (nothing allocated) and prints
``compile().memory_analysis()`` per device: the 8B check runs on CPU with
``--devices=8`` simulated devices and an FSDP mesh. ``--profile_dir`` traces
three steps with jax.profiler.
"""
import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHAPES = {  # hidden, layers, heads, kv heads, head_dim, ffn, vocab, tied
    "1b": dict(hidden_dim=2048, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
               mlp_dim=8192, vocab_size=128256, tie_word_embeddings=True),     # Llama-3.2-1B
    "3b": dict(hidden_dim=3072, num_layers=28, num_heads=24, num_kv_heads=8, head_dim=128,
               mlp_dim=8192, vocab_size=128256, tie_word_embeddings=True),     # Llama-3.2-3B
    "8b": dict(hidden_dim=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
               mlp_dim=14336, vocab_size=128256, tie_word_embeddings=False),   # Llama-3.1-8B
}
INSTR, LABEL, FEATURE_DIM = 16, 32, 1024


def make_config(a):
  from vsrllm_jax.configs import common  # pylint: disable=g-import-not-at-top
  c = common.get_base_config()
  c.batch_size = a.batch
  c.mesh.shape = tuple(a.mesh)
  c.sharding = a.sharding
  c.dtype, c.param_dtype, c.frozen_param_dtype = a.dtype, "float32", a.frozen_dtype
  c.data.max_frames = a.seq - INSTR - LABEL
  c.data.max_instruction_tokens, c.data.max_label_tokens = INSTR, LABEL
  c.encoder.path = ""
  c.encoder.hidden_dim = FEATURE_DIM    # the projector's input width (features are given)
  c.llm.path = c.llm.tokenizer_path = ""
  c.llm.update(dict(SHAPES[a.shape], max_position_embeddings=max(a.seq, 2048),
                    remat_policy=a.remat, attention_impl=a.attention,
                    scan_unroll=a.unroll, rope_theta=500000.0, rms_norm_eps=1e-5))
  c.projector = common.ConfigDict(dict(name="mlp"))
  return c


def host_batch(a, vocab: int) -> dict:
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  frames = a.seq - INSTR - LABEL
  ones = lambda n: np.ones((a.batch, n), bool)
  return dict(features=rng.normal(size=(a.batch, frames, FEATURE_DIM)).astype(np.float32),
              features_mask=ones(frames),
              instruction_ids=rng.integers(0, vocab, (a.batch, INSTR)).astype(np.int32),
              instruction_mask=ones(INSTR),
              label_ids=rng.integers(0, vocab, (a.batch, LABEL)).astype(np.int32),
              label_mask=ones(LABEL))


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--shape", choices=sorted(SHAPES), default="1b")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--seq", type=int, default=1024)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--remat", default="none")
  p.add_argument("--unroll", type=int, default=1, help="decoder layers per scan iteration")
  p.add_argument("--attention", choices=("xla", "cudnn"), default="xla")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--frozen_dtype", default="bfloat16")
  p.add_argument("--sharding", default="fsdp")
  p.add_argument("--mesh", type=int, nargs=3, default=(1, -1, 1))
  p.add_argument("--compile_only", action="store_true")
  p.add_argument("--devices", type=int, default=0, help="simulated CPU devices (compile_only)")
  p.add_argument("--profile_dir", default="")
  a = p.parse_args()
  if a.devices:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={a.devices}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

  import jax  # pylint: disable=g-import-not-at-top
  from vsrllm_jax import sharding  # pylint: disable=g-import-not-at-top
  from vsrllm_jax.models import build as build_lib  # pylint: disable=g-import-not-at-top
  from vsrllm_jax.run import state as state_lib  # pylint: disable=g-import-not-at-top
  from vsrllm_jax.run import throughput  # pylint: disable=g-import-not-at-top
  from vsrllm_jax.training import step as step_lib  # pylint: disable=g-import-not-at-top

  config = make_config(a)
  mesh = sharding.make_mesh(config.mesh.shape)
  model = build_lib.build_model(config)
  device = jax.devices()[0]
  head = dict(shape=a.shape, batch=a.batch, seq=a.seq, remat=a.remat, attention=a.attention,
              unroll=a.unroll,
              dtype=a.dtype,
              frozen_dtype=a.frozen_dtype, sharding=a.sharding, mesh=dict(mesh.shape),
              device=device.device_kind, devices=len(jax.devices()), jax=jax.__version__)
  print(json.dumps(head), flush=True)
  hb = host_batch(a, model.llm_config.vocab_size)
  abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                            sharding=sharding.batch_sharding(mesh, v.ndim))
                    for k, v in hb.items()}

  layout = state_lib.layout(model, config, mesh)
  if a.compile_only:
    state = layout.abstract()
  else:
    t = time.perf_counter()
    state = jax.block_until_ready(state_lib.create(model, config, layout))
    print(json.dumps({"init_s": round(time.perf_counter() - t, 1)}), flush=True)

  t = time.perf_counter()
  compiled = step_lib.make_train_step(model, config, layout).lower(state, abstract_batch).compile()
  compile_s = time.perf_counter() - t
  mem = compiled.memory_analysis()
  gib = lambda b: round(b / 2**30, 2)
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.params))
  memory = dict(compile_s=round(compile_s, 1), params_gib_total=gib(param_bytes))
  if mem is not None:
    memory.update(per_device_gib=dict(
        arguments=gib(mem.argument_size_in_bytes), outputs=gib(mem.output_size_in_bytes),
        temp=gib(mem.temp_size_in_bytes), aliased=gib(mem.alias_size_in_bytes),
        total=gib(mem.argument_size_in_bytes + mem.output_size_in_bytes
                  + mem.temp_size_in_bytes - mem.alias_size_in_bytes)))
  print(json.dumps(memory), flush=True)

  flops = throughput.model_flops(model, state.params, state.model_state, abstract_batch)
  counted = throughput.counting_model(model)
  hardware = throughput.hardware_flops(
      lambda: step_lib.make_train_step(counted, config, layout), state, abstract_batch)
  print(json.dumps({"model_tflop_per_step": round(flops["total"] / 1e12, 3),
                    "llm_tflop": round(flops["llm"] / 1e12, 3),
                    "projector_tflop": round(flops["projector"] / 1e12, 4),
                    "hardware_tflop_per_step": round(hardware / 1e12, 3),
                    "llm_tokens_per_step": int(flops["llm_tokens"])}), flush=True)
  if a.compile_only:
    return

  batch = sharding.global_batch(hb, mesh)
  for _ in range(a.warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(a.steps):
    t = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  step_s = statistics.median(times)
  peak = throughput.peak_flops_per_device(device)
  out = {"median_step_ms": round(step_s * 1e3, 2), "runs_ms": [round(x * 1e3, 1) for x in times],
         "tokens_per_s": round(flops["llm_tokens"] / step_s),
         "model_tflop_per_s": round(flops["total"] / step_s / 1e12, 1),
         "loss": float(metrics["train/loss"])}
  if peak:
    n = len(jax.devices())
    out.update(peak_tflop_per_s=peak / 1e12, mfu=round(flops["total"] / step_s / peak / n, 4),
               hfu=round(hardware / step_s / peak / n, 4))
  stats = device.memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    out["device_peak_gib"] = gib(stats["peak_bytes_in_use"])
  print(json.dumps(out), flush=True)

  if a.profile_dir:
    jax.profiler.start_trace(a.profile_dir)
    for _ in range(3):
      state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    jax.profiler.stop_trace()
    print(json.dumps({"profile": a.profile_dir}), flush=True)


if __name__ == "__main__":
  main()
