"""Input pipeline: batch format, tokenizer, resumable iterator, eval coverage, bad data."""
from __future__ import annotations

import os

import numpy as np
import pytest
import transformers

from tests.helpers.tiny import small_data_config
from tests.helpers import no_tf
from vsrllm_jax.data.synthetic import grid_grammar
from vsrllm_jax.data import examples, pipeline
from vsrllm_jax.data import tokenizer as tokenizer_lib

GLOBAL_BATCH = 4


@pytest.fixture(scope="module")
def data_cfg(tmp_path_factory):
  return small_data_config(tmp_path_factory.mktemp("data"), image_size=16, max_frames=48,
                           train_clips=40, validation_clips=8, test_clips=8)


@pytest.fixture(scope="module")
def tok(data_cfg):
  return tokenizer_lib.load_tokenizer(
      tokenizer_lib.default_tokenizer_dir(data_cfg.data_dir, data_cfg.instruction))


def _train_iter(data_cfg, tok, source=None):
  return iter(pipeline.make_train_loader(data_cfg, tok, global_batch_size=GLOBAL_BATCH, seed=3,
                                         source=source))


def test_train_batch_format(data_cfg, tok):
  batch = next(_train_iter(data_cfg, tok))
  b, t, s = GLOBAL_BATCH, data_cfg.max_frames, data_cfg.image_size
  li, ll = data_cfg.max_instruction_tokens, data_cfg.max_label_tokens
  expected = {"video": ((b, t, s, s, 1), np.uint8), "video_mask": ((b, t), bool),
              "instruction_ids": ((b, li), np.int32), "instruction_mask": ((b, li), bool),
              "label_ids": ((b, ll), np.int32), "label_mask": ((b, ll), bool),
              "example_mask": ((b,), bool), "id": ((b,), object), "text": ((b,), object),
              "task": ((b,), object)}
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
  assert batch["example_mask"].all()
  for i in range(b):
    frames = batch["video_mask"][i].sum()
    assert batch["video_mask"][i, :frames].all() and not batch["video"][i, frames:].any()
    n = batch["label_mask"][i].sum()
    assert batch["label_mask"][i, :n].all() and batch["label_ids"][i, n - 1] == tok.eos_token_id
    assert (batch["label_ids"][i, n:] == tok.pad_token_id).all()
    assert tok.decode(batch["label_ids"][i, :n - 1].tolist()) == batch["text"][i]
    assert batch["instruction_ids"][i, 0] == tok.bos_token_id
    m = batch["instruction_mask"][i].sum()
    assert tok.decode(batch["instruction_ids"][i, 1:m].tolist()) == \
        "recognize this speech in english . input :"
    assert isinstance(batch["id"][i], str) and batch["id"][i].startswith("train/")


def test_tokenizer_round_trips_and_loads_with_auto_tokenizer(data_cfg, tok, tmp_path):
  path = tokenizer_lib.default_tokenizer_dir(data_cfg.data_dir, data_cfg.instruction)
  assert path == tokenizer_lib.default_tokenizer_dir(data_cfg.data_dir, data_cfg.instruction)
  assert sorted(os.listdir(os.path.dirname(path))) == [os.path.basename(path)]  # no temp dirs
  auto = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
  assert (auto.pad_token_id, auto.bos_token_id, auto.eos_token_id, auto.unk_token_id) == \
      (0, 1, 2, 3)
  rng = np.random.default_rng(0)
  for _ in range(20):
    sentence = " ".join(grid_grammar.sample_sentence(rng))
    ids = auto.encode(sentence, add_special_tokens=False)
    assert len(ids) == 6 and tok.unk_token_id not in ids
    assert auto.decode(ids) == sentence
  assert auto.encode("Bin BLUE", add_special_tokens=False) == \
      auto.encode("bin blue", add_special_tokens=False)
  with pytest.raises(FileNotFoundError, match="nowhere"):
    tokenizer_lib.load_tokenizer(tmp_path / "nowhere")


def test_iterator_state_restores_exactly(data_cfg, tok):
  it = _train_iter(data_cfg, tok)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]  # crosses an epoch boundary (40 / 4 = 10 steps)
  resumed = _train_iter(data_cfg, tok)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    assert list(got["id"]) == list(want["id"])
    for key in ("video", "label_ids", "video_mask"):
      np.testing.assert_array_equal(got[key], want[key])


def _eval_ids(data_cfg, tok, **kwargs):
  batches = list(pipeline.eval_batches(data_cfg, tok, "validation", **kwargs))
  real = [i for b in batches for i, keep in zip(b["id"], b["example_mask"]) if keep]
  return batches, real


def test_eval_batches_cover_split_once(data_cfg, tok, monkeypatch):
  batches, real = _eval_ids(data_cfg, tok, global_batch_size=3)
  assert len(batches) == 3 and all(b["video"].shape[0] == 3 for b in batches)
  assert [r.rsplit("/", 1)[1] for r in real] == [f"{i:06d}" for i in range(8)]  # in order
  last = batches[-1]
  assert list(last["example_mask"]) == [True, True, False]
  assert not last["label_mask"][2].any() and not last["video_mask"][2].any()
  assert pipeline.split_size(data_cfg, "validation") == 8
  assert len(_eval_ids(data_cfg, tok, global_batch_size=3, max_batches=1)[0]) == 1
  # Two processes: each yields the same number of batches; together every record once.
  monkeypatch.setattr(pipeline.jax, "process_count", lambda: 2)
  per_process = []
  for p in range(2):
    monkeypatch.setattr(pipeline.jax, "process_index", lambda p=p: p)
    per_process.append(_eval_ids(data_cfg, tok, global_batch_size=6))
  assert len(per_process[0][0]) == len(per_process[1][0]) == 2
  assert sorted(per_process[0][1] + per_process[1][1]) == sorted(real)


def test_too_long_labels_and_instructions_are_errors(data_cfg, tok):
  short = data_cfg.copy_and_resolve_references()
  short.max_label_tokens = 6  # six words + EOS need 7
  with pytest.raises(ValueError, match=r"data\.max_label_tokens.*") as err:
    next(_train_iter(short, tok))
  assert "train/" in str(err.value) and "7 tokens" in str(err.value)
  with pytest.raises(ValueError, match=r"data\.max_label_tokens"):
    next(pipeline.eval_batches(short, tok, "test", global_batch_size=2))
  short = data_cfg.copy_and_resolve_references()
  short.max_instruction_tokens = 4
  with pytest.raises(ValueError, match=r"data\.max_instruction_tokens"):
    pipeline.make_train_loader(short, tok, global_batch_size=GLOBAL_BATCH, seed=0)
  with pytest.raises(ValueError, match="multiple"):
    pipeline.make_train_loader(data_cfg, tok, global_batch_size=0, seed=0)


class _DamagedSource:
  """The real split with a read error, a wrong shape and an over-long clip."""

  def __init__(self, source, max_frames):
    self.source, self.max_frames = source, max_frames

  def __len__(self):
    return len(self.source)

  def __repr__(self):
    return "DamagedSource"

  def __getitem__(self, index):
    if index == 1:
      raise OSError("simulated decode error")
    record = dict(self.source[index])
    if index == 4:
      record["video"] = record["video"][..., 0]
    if index == 6:
      record["video"] = np.zeros((self.max_frames + 1,) + record["video"].shape[1:], np.uint8)
      record["num_frames"] = self.max_frames + 1
    return record


def test_corrupt_records_are_skipped_and_counted(data_cfg, tok):
  damaged = _DamagedSource(pipeline.data_source(data_cfg, "validation"), data_cfg.max_frames)
  examples.reset_skipped_record_count()
  batches = list(pipeline.eval_batches(data_cfg, tok, "validation", global_batch_size=4,
                                       source=damaged))
  assert examples.skipped_record_count() == 3
  assert [list(b["example_mask"]) for b in batches] == [[True, False, True, True],
                                                        [False, True, False, True]]
  bad = {damaged.source[i]["id"].decode() for i in (1, 4, 6)}
  it = _train_iter(data_cfg, tok, source=damaged)
  seen = [i for _ in range(6) for i in next(it)["id"]]
  assert len(seen) == 6 * GLOBAL_BATCH and not bad & set(seen)
  assert examples.skipped_record_count() > 3


def test_generate_and_read_without_tensorflow(tmp_path):
  code = f"""
from vsrllm_jax.configs.common import get_base_config
from vsrllm_jax.data import pipeline, tokenizer
cfg = get_base_config().data
cfg.update(dict(image_size=16, max_frames=48, train_clips=8, validation_clips=4, test_clips=4,
                data_dir={str(tmp_path)!r}))
tok = tokenizer.load_tokenizer(tokenizer.default_tokenizer_dir(cfg.data_dir, cfg.instruction))
batch = next(iter(pipeline.make_train_loader(cfg, tok, global_batch_size=2, seed=0)))
assert batch["video"].shape == (2, 48, 16, 16, 1), batch["video"].shape
evals = list(pipeline.eval_batches(cfg, tok, "test", global_batch_size=4))
assert len(evals) == 1 and evals[0]["example_mask"].all()
print("NO_TF_OK")
"""
  result = no_tf.run_without_tensorflow(code, cwd=no_tf.REPO_ROOT)
  assert result.returncode == 0, result.stderr[-4000:]
  assert "NO_TF_OK" in result.stdout
