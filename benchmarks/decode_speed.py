r"""Greedy decoding speed: our jitted decoder against transformers ``generate()``, CPU.

  python benchmarks/decode_speed.py

Both sides run the same random weights (a transformers Llama saved with
``save_pretrained`` and read with our loader), fp32, the same token prompts,
greedy with EOS disabled so both produce exactly --new_tokens tokens per row
(prefill of the prompt + one step per further token): ours is the one decoder
layer under the layer scan, as training runs it, with a KV cache. torch runs with
--threads threads and its default (sdpa) attention, under inference_mode.
Prints JSON lines: compile time (ours, separate), then the median over --runs
timed runs of each side, new tokens per second, the ratio (goal >= 2), and the
fraction of generated tokens that agree. Last, what this machine allows: the
prefill's matmul FLOPs (the work it needs: the last layer's queries and MLP only
at the position whose logits are wanted) at the XLA matmul rate measured here,
plus one weight read per further token at the skinny-matmul (batch-rows x
weights) bandwidth measured here; ``floor_s`` is that sum and ``best_ratio`` =
theirs / floor, the ratio a decoder with no overhead at all would reach against
this torch.
"""
import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import machine_rates  # noqa: E402  (benchmarks/)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--prompt", type=int, default=100)
  p.add_argument("--new_tokens", type=int, default=32)
  p.add_argument("--hidden", type=int, default=512)
  p.add_argument("--layers", type=int, default=8)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--kv_heads", type=int, default=4)
  p.add_argument("--ffn", type=int, default=1408)
  p.add_argument("--vocab", type=int, default=32000)
  p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
  p.add_argument("--runs", type=int, default=9)
  p.add_argument("--warmup", type=int, default=1)
  a = p.parse_args()

  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from vsrllm_jax.inference import generation  # pylint: disable=g-import-not-at-top
  from vsrllm_jax.formats import hf_llm  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(a.threads)
  transformers.utils.logging.disable_progress_bar()
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(
      vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.ffn,
      num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
      max_position_embeddings=1024)
  hf = transformers.LlamaForCausalLM(cfg).eval()
  hf.generation_config.eos_token_id = None  # exactly new_tokens tokens per row
  hf.generation_config.pad_token_id = 0
  ids = np.random.default_rng(0).integers(3, a.vocab, (a.batch, a.prompt)).astype(np.int64)
  ids_t = torch.as_tensor(ids)
  mask_t = torch.ones_like(ids_t)

  with tempfile.TemporaryDirectory() as tmp:
    hf.save_pretrained(tmp)
    model, params = hf_llm.from_pretrained(tmp, dtype="float32", param_dtype="float32")
  params = jax.device_put(params)
  gen = jax.jit(functools.partial(generation.greedy_generate_from_ids, model,
                                  max_new_tokens=a.new_tokens, eos_id=-1, pad_id=0))
  ids_j = jax.device_put(ids.astype(np.int32))
  t = time.perf_counter()
  compiled = gen.lower(params, ids_j).compile()
  compile_s = time.perf_counter() - t

  def ours():
    return np.asarray(jax.block_until_ready(compiled(params, ids_j)))

  def theirs():
    with torch.inference_mode():
      out = hf.generate(input_ids=ids_t, attention_mask=mask_t, max_new_tokens=a.new_tokens,
                        do_sample=False, num_beams=1, eos_token_id=None, pad_token_id=0)
    return out[:, a.prompt:].numpy()

  for _ in range(a.warmup):
    ours_tokens, their_tokens = ours(), theirs()
  assert ours_tokens.shape == their_tokens.shape == (a.batch, a.new_tokens), (
      ours_tokens.shape, their_tokens.shape)
  # Alternate the sides so that drift on a shared machine hits both alike.
  ours_all, theirs_all = [], []
  for _ in range(a.runs):
    for fn, times in ((ours, ours_all), (theirs, theirs_all)):
      t = time.perf_counter()
      fn()
      times.append(time.perf_counter() - t)
  ours_s, theirs_s = statistics.median(ours_all), statistics.median(theirs_all)
  new = a.batch * a.new_tokens
  print(json.dumps({"shape": dict(batch=a.batch, prompt=a.prompt, new_tokens=a.new_tokens,
                                  hidden=a.hidden, layers=a.layers, heads=a.heads,
                                  kv_heads=a.kv_heads, ffn=a.ffn, vocab=a.vocab),
                    "platform": jax.devices()[0].platform, "cpus": os.cpu_count(),
                    "loadavg_1m": round(os.getloadavg()[0], 2),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "transformers": transformers.__version__, "jax": jax.__version__,
                    "ours_compile_s": round(compile_s, 2)}))
  print(json.dumps({"ours_median_s": round(ours_s, 4), "theirs_median_s": round(theirs_s, 4),
                    "ours_runs_s": [round(x, 4) for x in ours_all],
                    "theirs_runs_s": [round(x, 4) for x in theirs_all],
                    "ours_tokens_per_s": round(new / ours_s, 1),
                    "theirs_tokens_per_s": round(new / theirs_s, 1),
                    "speedup": round(theirs_s / ours_s, 2),
                    "tokens_equal": round(float(np.mean(ours_tokens == their_tokens)), 4),
                    "rows_equal": int(np.all(ours_tokens == their_tokens, axis=1).sum())}))
  floor = _floor(a)
  print(json.dumps(dict(floor, best_ratio=round(theirs_s / floor["floor_s"], 2),
                        ours_over_floor=round(ours_s / floor["floor_s"], 2))))


def _floor(a) -> dict:
  """Lower bound on greedy decode time from two rates measured on this machine."""
  kv = a.hidden // a.heads * a.kv_heads
  layer_weights = a.hidden * (2 * a.hidden + 2 * kv) + 3 * a.hidden * a.ffn   # q,o,k,v + MLP
  kv_weights = 2 * a.hidden * kv
  # Work the prompt needs: every position through all layers but the last, whose
  # keys and values alone cover every position (its output is wanted at one).
  prefill_rows = a.batch * a.prompt * ((a.layers - 1) * layer_weights + kv_weights) + \
      a.batch * (layer_weights - kv_weights + a.hidden * a.vocab)
  prefill_flops = 2 * prefill_rows
  step_bytes = 4 * (a.layers * layer_weights + a.hidden * a.vocab)             # fp32, + head
  flops_per_s = machine_rates.matmul_flops_per_s(a.batch * a.prompt, a.hidden, a.ffn)
  bytes_per_s = machine_rates.weight_bytes_per_s(a.batch, a.hidden, a.vocab)
  floor = prefill_flops / flops_per_s + (a.new_tokens - 1) * step_bytes / bytes_per_s
  return {"matmul_gflops": round(flops_per_s / 1e9, 1),
          "skinny_matmul_gb_per_s": round(bytes_per_s / 1e9, 2),
          "step_weight_mb": round(step_bytes / 1e6, 1), "floor_s": round(floor, 4)}


if __name__ == "__main__":
  main()
