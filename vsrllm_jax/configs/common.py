"""Shared defaults for every config, and the ``name=value`` argument parser.

Each config file says only what differs from ``get_base_config()``. Configs
take an optional string argument for sweeps, e.g.
``--config=configs/contrastive.py:seed=1,projector=mlp``; then
``--config.optim.schedules.main.peak_lr=3e-4`` overrides single values.
Unknown argument names and unknown keys are errors that list the valid ones.
"""
from __future__ import annotations

import os

import ml_collections

# The embedded default models, built by `python -m vsrllm_jax.tools.make_embedded`.
EMBEDDED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "embedded")

ConfigDict = ml_collections.ConfigDict


def parse_arg(arg: str | None, **defaults) -> ConfigDict:
  """Parses ``'a=1,b=x'`` against ``defaults``; values take the default's type.

  An unknown name raises ``ValueError`` naming the valid ones.
  """
  result = ConfigDict(dict(defaults))
  if not arg:
    return result
  for item in arg.split(","):
    if not item:
      continue
    if "=" not in item:
      raise ValueError(f"config arg {item!r} is not of the form name=value; valid names: "
                       f"{sorted(defaults)}")
    name, value = item.split("=", 1)
    if name not in defaults:
      raise ValueError(f"unknown config arg {name!r}; valid names: {sorted(defaults)}")
    default = defaults[name]
    if isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config arg {name!r} expects a bool, got {value!r}")
      result[name] = value.lower() in ("true", "1")
    elif default is None:
      result[name] = value
    else:
      result[name] = type(default)(value)
  return result


def get_base_config() -> ConfigDict:
  """Every key a run reads, with its default. Small enough for a laptop CPU."""
  c = ConfigDict()
  c.seed = 0
  c.total_steps = 2000
  c.batch_size = 16            # global batch, split over the data-parallel devices
  c.grad_accum_steps = 1       # k > 1: k micro-batches of batch_size / k per update
  c.eval_batch_size = 32
  c.log_every = 100
  # (first, last) train steps to trace with jax.profiler into WORKDIR/profile
  # (TensorBoard's profile plugin or Perfetto read it); () = no trace.
  c.profile_steps = ()
  # perf/mfu and perf/hfu need the chip's dense bf16 peak: known H100/H200/A100
  # and TPU v4/v5e/v5p/v6e kinds are looked up (throughput.PEAK_FLOPS); > 0 overrides.
  c.peak_flops_per_device = 0.0
  c.log_hfu = True             # XLA's FLOP count of the step (one lowering per batch shape)
  c.eval_every = 500           # validation WER/CER (also picks the best checkpoint)
  c.max_eval_batches = -1      # -1: the whole split
  c.checkpoint_every = 500
  c.keep_checkpoints = 2

  # Device mesh (data, fsdp, tensor); -1 takes the remaining devices.
  c.mesh = ConfigDict(dict(shape=(-1, 1, 1)))
  # Where params and activations live (vsrllm_jax/sharding.py PRESETS): 'dp'
  # (weights replicated), 'fsdp' (weights split over fsdp: frozen 7-8B LLMs) or
  # 'fsdp_tp' (plus heads/MLP/vocab over tensor). On a mesh without fsdp and
  # tensor axes (the default) all three are data parallel.
  c.sharding = "fsdp_tp"
  # Logical axis name -> mesh axes, replacing the preset when non-empty, e.g.
  # (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("act_batch", ("data", "fsdp"))).
  # Names not listed are replicated; an axis that does not divide a dimension
  # is dropped for that array (logged).
  c.sharding_rules = ()

  c.data = ConfigDict(dict(
      # synthetic_lips | lrs3 (VSP-LLM manifests + mp4) | image_captions (data/sources.py)
      name="synthetic_lips",
      data_dir="",               # '' -> $VSRLLM_DATA_DIR or ~/.cache/vsrllm_jax/tensorflow_datasets
      # lrs3 / image_captions: the local folder holding {split}.tsv/.wrd/
      # .cluster_counts (lrs3) or captions.jsonl + images; prepared into data_dir once.
      manifest_dir="",
      storage="mp4",             # lrs3: keep encoded mp4 bytes ('mp4') or decoded 'frames'
      source_image_size=96,      # lrs3: the stored mouth crops' size (cropped to image_size)
      max_bad_fraction=0.01,     # lrs3: building stops past this fraction of bad samples
      use_cluster_counts=False,  # lrs3: batches carry VSP-LLM cluster counts (deduplication)
      time_mask_prob=0.0,        # training without a feature cache: AV-HuBERT time masking
      resize_mode="center_crop",  # image_captions: 'center_crop' (CLIP) or 'squash' (SigLIP)
      image_size=32,             # square frames (after cropping), pixels
      max_frames=64,             # clips are padded to this many frames (25 fps)
      # Length buckets (frame counts, max_frames added): a clip pads to the
      # smallest bucket that holds it and each global batch is one bucket, so
      # the step compiles once per bucket. () -> every clip pads to max_frames.
      frame_buckets=(),
      train_clips=2000,
      validation_clips=200,
      test_clips=200,
      generation_seed=0,
      # '' -> each record's task's instruction (lrs3: VSR or VST, data/tasks.py).
      instruction="Recognize this speech in English. Input:",
      max_instruction_tokens=16,
      max_label_tokens=12,       # transcript tokens + EOS
      # Instruct checkpoints: render the instruction as a user turn of the
      # tokenizer's chat template (+ assistant header); labels then end with the
      # template's end-of-turn token. An error if the tokenizer has no template.
      chat_template=False,
      worker_count=0,            # grain worker processes (0 = in-process)
      # Train on frozen-encoder features computed once (eval-style preprocessing,
      # one copy per clip) and cached under data_dir/feature_cache/<key>; the key
      # covers encoder weights, data spec and preprocessing. False: run the
      # encoder in every step.
      cache_features=True,
      # > 0: batches carry the transcript's characters for the CTC head
      # ('ctc_labels'/'ctc_label_mask', this many slots; models/ctc.py). 0: none.
      ctc_max_chars=0,
  ))

  c.encoder = ConfigDict(dict(
      name="avhubert",
      # A pretrained encoder: a dir (config.json + model.safetensors) or a
      # fairseq AV-HuBERT .pt (models/encoders/); its shape
      # wins over the keys below. '' -> random init of the shape below.
      path=os.path.join(EMBEDDED_DIR, "encoder"),
      # A fairseq .pt path: None -> the checkpoint's cfg says (True if absent).
      layer_norm_first=None,
      stem_channels=16,
      resnet_channels=(16, 32, 64, 64),
      resnet_blocks=(1, 1, 1, 1),
      hidden_dim=64,
      num_layers=2,
      num_heads=4,
      mlp_dim=128,
  ))

  c.projector = ConfigDict(dict(name="mlp"))

  c.llm = ConfigDict(dict(
      # A local Hugging Face Llama checkpoint dir; '' -> random init of the
      # shape below (the embedded LLM's shape, for the random-LLM ablation).
      path=os.path.join(EMBEDDED_DIR, "llm"),
      # '' -> llm.path's tokenizer, else the synthetic data's word-level one.
      tokenizer_path=os.path.join(EMBEDDED_DIR, "llm"),
      vocab_size=0,              # 0 -> from the tokenizer (random init only)
      hidden_dim=128,
      num_layers=3,
      num_heads=4,
      num_kv_heads=2,
      head_dim=32,
      mlp_dim=256,
      rope_theta=10000.0,
      rms_norm_eps=1e-6,
      tie_word_embeddings=False,
      max_position_embeddings=512,
      remat_policy="none",
      # 'cudnn': fused flash attention in training on NVIDIA GPUs (bf16); 'xla' anywhere.
      attention_impl="xla",
      # Decoder layers per scan iteration: 1 = a loop (compile time flat in
      # depth); num_layers = no loop (faster steps on GPUs, longer compiles).
      scan_unroll=1,
      # LoRA adapters on the LLM (models/lora.py): targets from q, k, v, o, gate,
      # up, down; output += dropout(x) A B * alpha / rank. VSP-LLM: q, k, v, r=16,
      # alpha=32, dropout=0.05. They train with the param group '/lora_[ab]$'
      # (optim.param_groups; give it its own schedule name for its own rate).
      lora=ConfigDict(dict(enabled=False, targets=("q", "k", "v"), rank=16, alpha=32.0,
                           dropout=0.05)),
  ))

  c.dtype = "float32"            # compute dtype of the models ('bfloat16' on accelerators)
  c.param_dtype = "float32"      # trainable params (and their optimizer state)
  # Storage of frozen params (encoder, LLM): '' -> param_dtype; 'bfloat16' halves
  # their memory. A pretrained LLM is then read in this dtype.
  c.frozen_param_dtype = ""

  c.loss_weights = ConfigDict(dict(lm=1.0))
  # label_smoothing: eps of fairseq's label_smoothed_nll_loss on the LM loss (eps / V
  # spread over the vocabulary; training/losses.py); 0 = plain cross-entropy.
  c.loss = ConfigDict(dict(label_smoothing=0.0))
  # CTC auxiliary head over characters (models/ctc.py): on the frozen 'encoder'
  # features or the 'projector' tokens (sequence-preserving projectors only).
  # Enabling it needs data.ctc_max_chars > 0 and loss_weights.ctc; the default
  # param groups train '^ctc_head/' with the projector.
  c.ctc = ConfigDict(dict(enabled=False, source="encoder"))

  c.optim = ConfigDict(dict(
      # (regex over 'a/b/c' param paths, schedule name | None); first match
      # wins and every param must match. None = frozen (no optimizer state).
      param_groups=(("^(projector|ctc_head)/", "main"), ("/lora_[ab]$", "main"), (".*", None)),
      schedules=ConfigDict(dict(main=ConfigDict(dict(
          kind="warmup_cosine",    # warmup_cosine | tri_stage
          peak_lr=3e-3,
          warmup_steps=100,
          end_lr_scale=0.05,       # warmup_cosine: final lr / peak
          hold_steps=0,            # tri_stage: steps at peak after warmup
          init_lr_scale=0.01,      # tri_stage: initial lr / peak
          final_lr_scale=0.05,     # tri_stage: final lr / peak
      )))),
      weight_decay=0.01,
      b1=0.9,
      b2=0.98,
      eps=1e-8,
      clip_grad_norm=1.0,
      # N > 0: the encoder params the groups train stay frozen for the first N
      # updates, then train (fresh AdamW state, the global lr schedule; VSP-LLM's
      # key; needs data.cache_features=False). 0 = as param_groups say.
      freeze_finetune_updates=0,
  ))

  # Decoding for validation, test and the decode command (models/generation.py).
  c.decode = ConfigDict(dict(
      max_new_tokens=12,         # generated tokens per clip, EOS included
      strategy="greedy",         # greedy | sample | beam
      temperature=1.0,           # sample: logits / temperature (0 = greedy)
      top_p=1.0,                 # sample: nucleus mass in (0, 1] (1 = off)
      top_k=0,                   # sample: keep the k most likely tokens (0 = off)
      seed=0,                    # sample: the n-th decoded batch uses fold_in(key(seed), n)
      beam_size=4,               # beam: hypotheses kept per clip
      length_penalty=1.0,        # beam: score = sum logprob / generated_length ** length_penalty
      # beam: 'heuristic' (transformers' early_stopping=False), 'beam_full'
      # (True: stop once beam_size hypotheses ended) or 'never' (exact).
      early_stopping="heuristic",
  ))
  return c
