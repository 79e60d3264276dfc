r"""VSP-LLM on LRS3: AV-HuBERT features, deduplication, VSR and VST tasks, a local LLM.

  python -m vsrllm_jax.train --workdir=/ckpt/lrs3_run --config=configs/lrs3.py:\
manifest_dir=/data/lrs3/433h_data,encoder=/models/large_vox_iter5.pt,llm=/models/Llama-3.2-1B

``manifest_dir`` holds VSP-LLM's ``{train,valid,test}.tsv/.wrd/.cluster_counts``
(ids ``lrs3/en-en`` for recognition, ``lrs3/en-es|fr|it|pt`` for translation);
the first run decodes every clip once, skips and counts bad ones (stopping past
``data.max_bad_fraction``) and stores mp4 bytes as array_record under
``data.data_dir``. Each clip gets its task's instruction (``data/tasks.py``).
``lora=True``: VSP-LLM's LoRA on the LLM (q, k, v; r=16, alpha=32, dropout=0.05),
trained with the projector.
Frozen AV-HuBERT features are cached once per encoder and data; clips pad to
length buckets, so the step compiles once per bucket. Validation and test
report WER per recognition task and BLEU per translation task.
"""
from __future__ import annotations

from vsrllm_jax.configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, manifest_dir="", encoder="", llm="", projector="linear",
                          seed=0, steps=30000, lora=False)
  c = common.get_base_config()
  c.seed = args.seed
  c.total_steps = args.steps
  c.batch_size = 32
  c.eval_batch_size = 32
  c.eval_every = 2000
  c.checkpoint_every = 2000
  c.log_every = 100
  c.data.name = "lrs3"
  c.data.manifest_dir = args.manifest_dir
  c.data.image_size = 88              # AV-HuBERT's crop of the 96x96 mouth crops
  c.data.source_image_size = 96
  c.data.max_frames = 500             # 20 s at 25 fps; longer clips are left out (logged)
  c.data.frame_buckets = (100, 150, 200, 300)
  c.data.use_cluster_counts = True    # VSP-LLM deduplication
  c.data.instruction = ""             # each clip's task: VSR or VST into es/fr/it/pt
  c.data.max_instruction_tokens = 32
  c.data.max_label_tokens = 96
  c.data.worker_count = 4
  c.encoder.path = args.encoder       # fairseq AV-HuBERT .pt (Base or Large)
  c.llm.path = args.llm
  c.llm.tokenizer_path = args.llm
  c.llm.lora.enabled = args.lora      # the rest of config.llm.lora is VSP-LLM's recipe
  c.projector = common.ConfigDict(dict(name=args.projector))
  c.decode.max_new_tokens = 96
  c.optim.schedules.main.kind = "tri_stage"
  c.optim.schedules.main.peak_lr = 5e-4
  c.optim.schedules.main.warmup_steps = 500
  c.optim.schedules.main.hold_steps = 10000
  return c
