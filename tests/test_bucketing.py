"""Length buckets: one bucket per global batch, per-process slices, exact resume."""
import numpy as np
import pytest

from vsrllm_jax.configs import common
from tests.helpers import tiny
from vsrllm_jax.data import bucketing, pipeline
from vsrllm_jax.data import tokenizer as tokenizer_lib

BUCKETS = (8, 16, 32)


def test_resolve_and_bucket_of():
  assert bucketing.resolve_buckets((), 64) == (64,)
  assert bucketing.resolve_buckets((16, 8, 16), 32) == (8, 16, 32)
  with pytest.raises(ValueError, match="frame_buckets"):
    bucketing.resolve_buckets((8, 64), 32)
  assert [bucketing.bucket_of(n, BUCKETS) for n in (1, 8, 9, 32, 33)] == [8, 8, 16, 32, -1]


def _lengths(n=200, seed=0):
  return np.random.default_rng(seed).integers(1, 40, n)  # some longer than the largest bucket


def test_every_global_batch_is_one_bucket_and_epochs_cover_records_once():
  lengths = _lengths()
  sampler = bucketing.BucketBatchSampler(lengths, BUCKETS, 8, seed=3)
  per_epoch = sampler.batches_per_epoch()
  keys = np.asarray([sampler[i].record_key for i in range(2 * per_epoch * 8)])
  for epoch in range(2):
    batches = keys[epoch * per_epoch * 8:(epoch + 1) * per_epoch * 8].reshape(-1, 8)
    flat = batches.reshape(-1)
    assert len(set(flat.tolist())) == len(flat)              # no record twice in an epoch
    assert np.all(lengths[flat] <= BUCKETS[-1])               # too long: left out
    for batch in batches:
      assert len({bucketing.bucket_of(n, BUCKETS) for n in lengths[batch]}) == 1
  # Deterministic, seed-dependent, and the epochs differ.
  again = bucketing.BucketBatchSampler(lengths, BUCKETS, 8, seed=3)
  assert [again[i].record_key for i in range(50)] == keys[:50].tolist()
  other = bucketing.BucketBatchSampler(lengths, BUCKETS, 8, seed=4)
  assert [other[i].record_key for i in range(50)] != keys[:50].tolist()
  assert keys[:per_epoch * 8].tolist() != keys[per_epoch * 8:2 * per_epoch * 8].tolist()


def test_process_slices_of_a_global_batch_share_its_bucket():
  """grain's ShardByJaxProcess gives process p stream positions p, p+P, ...: with P
  processes of B rows each, process p's j-th batch is its share of global batch j."""
  lengths = _lengths()
  g, procs = 8, 2
  sampler = bucketing.BucketBatchSampler(lengths, BUCKETS, g, seed=0)
  b = g // procs
  for j in range(5):
    local = [[sampler[(j * b + k) * procs + p].record_key for k in range(b)]
             for p in range(procs)]
    glob = [sampler[j * g + i].record_key for i in range(g)]
    assert sorted(sum(local, [])) == sorted(glob)
    assert len({bucketing.bucket_of(lengths[k], BUCKETS) for k in glob}) == 1


def test_too_few_records_for_any_bucket_is_a_clear_error():
  with pytest.raises(ValueError, match="no length bucket holds a full global batch"):
    bucketing.BucketBatchSampler([3, 20, 30], BUCKETS, 4, seed=0)


def _config():
  config = tiny.tiny_config()
  with config.unlocked():
    config.data.max_frames = 32
    config.data.frame_buckets = (8, 16)
    config.data.max_instruction_tokens = 16
    config.data.max_label_tokens = 12
  return config, tokenizer_lib.load_tokenizer(common.EMBEDDED_DIR + "/llm")


class _RaggedFeatures:
  """A features source of clips with varied lengths (like the feature cache)."""
  feature_dim = 4

  def __init__(self, lengths):
    self.lengths = np.asarray(lengths, np.int32)

  def __len__(self):
    return len(self.lengths)

  def __repr__(self):
    return f"_RaggedFeatures({len(self.lengths)})"

  def __getitem__(self, i):
    if i == 5:
      raise OSError("disk error")   # a corrupt record becomes a filler of its bucket
    n = int(self.lengths[i])
    return dict(id=f"c{i}", text="bin blue at f two now", num_frames=np.int32(n),
                features=np.full((n, 4), i, np.float32))


def test_train_loader_pads_each_batch_to_its_bucket_and_resumes_exactly():
  config, tokenizer = _config()
  source = _RaggedFeatures(np.random.default_rng(1).integers(1, 33, 96))
  loader = pipeline.make_train_loader(config.data, tokenizer, global_batch_size=8, seed=0,
                                      source=source)
  it = iter(loader)
  shapes = set()
  for _ in range(6):
    batch = next(it)
    frames = batch["features"].shape[1]
    shapes.add(frames)
    real = batch["features_mask"].sum(1)
    kept = batch["example_mask"]
    assert np.all(real[kept] <= frames) and np.all(real[kept] > (0 if frames == 8 else frames // 2))
  assert shapes <= {8, 16, 32}
  state = it.get_state()
  expected = [next(it)["id"].tolist() for _ in range(3)]
  resumed = iter(pipeline.make_train_loader(config.data, tokenizer, global_batch_size=8, seed=0,
                                            source=source))
  resumed.set_state(state)
  assert [next(resumed)["id"].tolist() for _ in range(3)] == expected


def test_eval_batches_pad_to_the_longest_clip_bucket():
  config, tokenizer = _config()
  source = _RaggedFeatures([3, 7, 12, 4, 30, 2, 5, 6])
  batches = list(pipeline.eval_batches(config.data, tokenizer, "test",
                                       global_batch_size=2, source=source))
  assert [b["features"].shape[1] for b in batches] == [8, 16, 32, 8]
  assert batches[2]["example_mask"].tolist() == [True, False]   # record 5 is corrupt
