"""One process of the multi-host test (tests/test_multihost.py); run as a program.

  python -m tests.helpers.multihost_worker PROCESS_ID NUM_PROCESSES PORT WORKDIR OUT.json

Joins the others through ``jax.distributed`` (CPU, localhost), reads its own
shard of the first global batch through the real train loader (grain,
length buckets), assembles the global batch, runs one train step on a
(data=2, fsdp=2) mesh over all processes' devices, then saves and restores
the state with orbax from every process. Writes what it saw to OUT.json.
"""
import json
import os
import sys


class _Source:
  """Records in memory, with the frame counts the bucket sampler plans from."""

  def __init__(self, records):
    self.records = records
    self.lengths = [r["video"].shape[0] for r in records]

  def __len__(self):
    return len(self.records)

  def __getitem__(self, index):
    return self.records[index]


def main(process_id: int, num_processes: int, port: int, workdir: str, out: str) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  if num_processes > 1:   # as `train --distributed` under launch/gpu_multinode.sh
    from vsrllm_jax.run import distributed  # pylint: disable=g-import-not-at-top
    distributed.initialize_distributed({"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                                        "JAX_NUM_PROCESSES": str(num_processes),
                                        "JAX_PROCESS_ID": str(process_id)})
  import numpy as np  # pylint: disable=g-import-not-at-top

  from vsrllm_jax.configs import common  # pylint: disable=g-import-not-at-top
  from tests.helpers.tiny import tiny_config  # pylint: disable=g-import-not-at-top
  from vsrllm_jax import sharding  # pylint: disable=g-import-not-at-top
  from vsrllm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from vsrllm_jax.data.batch import model_inputs  # pylint: disable=g-import-not-at-top
  from vsrllm_jax.run import checkpoint  # pylint: disable=g-import-not-at-top
  from vsrllm_jax.run import state as state_lib  # pylint: disable=g-import-not-at-top
  from vsrllm_jax.training import step as step_lib  # pylint: disable=g-import-not-at-top
  from vsrllm_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from vsrllm_jax.models import build as build_lib  # pylint: disable=g-import-not-at-top

  tok = tokenizer_lib.load_tokenizer(os.path.join(common.EMBEDDED_DIR, "llm"))
  config = tiny_config("mlp")
  config.llm.vocab_size = len(tok)
  config.data.max_label_tokens = 8
  config.data.max_instruction_tokens = 12
  config.mesh.shape = (2, 2, 1)
  words = ["bin blue at f two now", "lay red by g nine soon", "place green in h one again",
           "set white with z six please"]
  rng = np.random.default_rng(0)
  records = [dict(id=f"clip{i:02d}", text=" ".join(words[i % 4].split()[:3]),
                  video=rng.integers(0, 255, (int(rng.integers(6, 13)), 16, 16, 1), np.uint8))
             for i in range(32)]
  # Length buckets: every global batch is one bucket and each process reads its
  # contiguous slice of it (bucketing.BucketBatchSampler), as on real data.
  config.data.frame_buckets = (9, 12)
  source = _Source(records)

  loader = pipeline.make_train_loader(config.data, tok, global_batch_size=config.batch_size,
                                      seed=1, source=source)
  batch = next(iter(loader))                       # this process's rows of the global batch
  mesh = sharding.make_mesh(config.mesh.shape)
  model = build_lib.build_model(config)
  layout = state_lib.layout(model, config, mesh)
  state = state_lib.create(model, config, layout)
  step = step_lib.make_train_step(model, config, layout)
  inputs = sharding.global_batch(model_inputs(batch), mesh)
  state, metrics = step(state, inputs)
  loss = float(metrics["train/loss"])

  ckpts = checkpoint.Checkpoints(workdir, keep=1)
  ckpts.save(1, state, None)
  restored, meta = ckpts.restore(1, layout.abstract())
  same = all(np.array_equal(np.asarray(a.data), np.asarray(b.data))
             for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(restored))
             for a, b in zip(x.addressable_shards, y.addressable_shards))
  emb = state.params["llm"]["embed_tokens"]["embedding"]
  ckpts.close()
  with open(out, "w") as f:
    json.dump(dict(process_index=jax.process_index(), process_count=jax.process_count(),
                   devices=len(jax.devices()), local_devices=len(jax.local_devices()),
                   ids=[str(i) for i in batch["id"]], loss=loss, restored_equal=bool(same),
                   restored_step=int(meta["step"]),
                   embedding_spec=str(emb.sharding.spec),
                   embedding_local_shard=list(emb.addressable_shards[0].data.shape)), f)
  if num_processes > 1:
    jax.distributed.shutdown()


if __name__ == "__main__":
  pid, n, port = (int(x) for x in sys.argv[1:4])
  main(pid, n, port, sys.argv[4], sys.argv[5])
