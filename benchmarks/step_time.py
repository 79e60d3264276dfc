r"""Our projector train step against the PyTorch way, side by side, same shapes, CPU.

  python benchmarks/step_time.py --peer=PATH/peer_torch_step.py [--steps 10] [--batch 8 ...]

The peer script is not part of this repository: pass its path with --peer, or
set VSRLLM_PEER_STEP. It runs unchanged in a subprocess of this invocation at
the same shapes and fp32: a frozen
transformers Llama fed ``[instruction | MLP(features) | label]`` as
``inputs_embeds``, training only the MLP with AdamW. Ours is the real train
step (``training.step.make_train_step``) of the composed model on cached encoder
features with the ``mlp`` projector (the same Dense-GELU-Dense), the frozen
LLM random-initialised at the same shape, AdamW on the projector only.
Prints JSON lines: our compile time and median step, the peer's median, the
ratio (goal >= 2.5), and the analytic FLOPs per step with the rate they imply
(``vsrllm_jax.run.throughput``'s count: frozen LLM 2N forward + 2N activation-gradient
per token plus attention, the projector's forward and both backward matmuls,
the LM head at label positions only for us, at every position for the peer). Last line: this machine's fp32 matmul rate at the
LLM's MLP shape, the step's floor at that rate, and the ratio a step with no
overhead would reach against the peer.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import machine_rates  # noqa: E402  (benchmarks/)

PEER_ENV = "VSRLLM_PEER_STEP"   # the peer script's path, when --peer is not given
SHAPE_FLAGS = ("batch", "frames", "enc_dim", "instr_len", "label_len", "hidden", "layers",
               "heads", "kv_heads", "ffn", "vocab")


def _config(a):
  from vsrllm_jax.configs import common  # pylint: disable=g-import-not-at-top
  c = common.get_base_config()
  c.batch_size = a.batch
  c.mesh.shape = (-1, 1, 1)
  c.data.max_frames = a.frames
  c.data.max_instruction_tokens = a.instr_len
  c.data.max_label_tokens = a.label_len
  c.encoder.path = ""                 # features are given; the encoder does not run (its
  c.encoder.hidden_dim = a.enc_dim     # width sets the projector's input at init)
  c.llm.path = ""
  c.llm.tokenizer_path = ""
  c.llm.update(dict(vocab_size=a.vocab, hidden_dim=a.hidden, num_layers=a.layers,
                    num_heads=a.heads, num_kv_heads=a.kv_heads, head_dim=a.hidden // a.heads,
                    mlp_dim=a.ffn, max_position_embeddings=1024))
  c.projector = common.ConfigDict(dict(name="mlp"))
  c.optim.weight_decay = 0.01         # torch AdamW's default
  return c


def _batch(a) -> dict:
  rng = np.random.default_rng(0)
  ones = lambda n: np.ones((a.batch, n), bool)
  return dict(features=rng.normal(size=(a.batch, a.frames, a.enc_dim)).astype(np.float32),
              features_mask=ones(a.frames),
              instruction_ids=rng.integers(0, a.vocab, (a.batch, a.instr_len)).astype(np.int32),
              instruction_mask=ones(a.instr_len),
              label_ids=rng.integers(0, a.vocab, (a.batch, a.label_len)).astype(np.int32),
              label_mask=ones(a.label_len))


def analytic_flops(a) -> dict:
  """FLOPs of one step (multiply-add = 2), ours and the peer's, as vsrllm_jax.throughput
  counts them: frozen LLM forward + activation gradients (attention's backward has
  twice its forward's products), the MLP projector's forward, dX and dW."""
  from vsrllm_jax.run import throughput  # pylint: disable=g-import-not-at-top
  from vsrllm_jax.models.llm.config import LlmConfig  # pylint: disable=g-import-not-at-top
  cfg = LlmConfig(vocab_size=a.vocab, hidden_dim=a.hidden, num_layers=a.layers,
                  num_heads=a.heads, num_kv_heads=a.kv_heads, head_dim=a.hidden // a.heads,
                  mlp_dim=a.ffn)
  seq = a.instr_len + a.frames + a.label_len
  proj = 3 * 2 * a.batch * a.frames * (a.enc_dim * a.hidden + a.hidden * a.hidden)
  llm = lambda positions: sum(throughput.llm_step_flops(cfg, a.batch, seq, positions).values())
  return {"ours": llm(a.label_len) + proj,     # LM head at the label positions only
          "peer": llm(seq) + proj}              # LM head on every position


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  defaults = dict(batch=8, frames=75, enc_dim=1024, instr_len=16, label_len=24, hidden=512,
                  layers=8, heads=8, kv_heads=4, ffn=1408, vocab=32000)
  for name in SHAPE_FLAGS:
    p.add_argument(f"--{name}", type=int, default=defaults[name])
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--threads", type=int, default=2, help="the peer's torch threads")
  p.add_argument("--peer", default=os.environ.get(PEER_ENV),
                 help=f"path of the peer script peer_torch_step.py (default: ${PEER_ENV})")
  a = p.parse_args()
  if not a.peer or not os.path.isfile(a.peer):
    p.error(f"the peer script is needed: pass --peer=PATH/peer_torch_step.py or set {PEER_ENV} "
            f"(got {a.peer!r})")

  import jax  # pylint: disable=g-import-not-at-top

  # The machine's matmul rate, measured first while nothing else of ours is running.
  peak = machine_rates.matmul_flops_per_s(a.batch * (a.instr_len + a.frames + a.label_len),
                                          a.hidden, a.ffn)
  compile_s, times = machine_rates.time_train_step(_config(a), _batch(a), warmup=a.warmup,
                                                   steps=a.steps)
  ours_ms = statistics.median(times) * 1e3

  args = [f"--{n}={getattr(a, n)}" for n in SHAPE_FLAGS]
  out = subprocess.run([sys.executable, a.peer, *args, f"--steps={a.steps}",
                        f"--warmup={a.warmup}", f"--threads={a.threads}"],
                       capture_output=True, text=True, check=True).stdout
  peer = json.loads(out.strip().splitlines()[-1])
  flops = analytic_flops(a)
  print(json.dumps({"shape": {n: getattr(a, n) for n in SHAPE_FLAGS}, "cpus": os.cpu_count(),
                    "jax": jax.__version__, "devices": len(jax.devices()),
                    "ours_compile_s": round(compile_s, 2)}))
  print(json.dumps({"ours_median_step_ms": round(ours_ms, 2),
                    "ours_runs_ms": [round(x * 1e3, 1) for x in times],
                    "peer_median_step_ms": peer["median_step_ms"], "peer_threads": peer["threads"],
                    "speedup": round(peer["median_step_ms"] / ours_ms, 2),
                    "ours_gflop": round(flops["ours"] / 1e9, 1),
                    "peer_gflop": round(flops["peer"] / 1e9, 1),
                    "ours_gflop_per_s": round(flops["ours"] / ours_ms / 1e6, 1),
                    "peer_gflop_per_s": round(flops["peer"] / peer["median_step_ms"] / 1e6, 1)}))
  floor_ms = flops["ours"] / peak * 1e3
  print(json.dumps({"matmul_gflop_per_s": round(peak / 1e9, 1),
                    "floor_ms": round(floor_ms, 1), "ours_over_floor": round(ours_ms / floor_ms, 2),
                    "best_ratio": round(peer["median_step_ms"] / floor_ms, 2)}))


if __name__ == "__main__":
  main()
