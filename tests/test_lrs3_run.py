"""LRS3 end to end: VSP-LLM manifests with real mp4s, a fairseq-layout AV-HuBERT,
length buckets, cluster counts, VSR + VST tasks, then ``transcribe`` on the mp4s."""
import json
import os

import numpy as np
import pytest

from vsrllm_jax.configs import common
from vsrllm_jax.configs import lrs3 as lrs3_config
from vsrllm_jax import transcribe
from vsrllm_jax.training import loop
from vsrllm_jax.data.synthetic import lrs3_layout
from vsrllm_jax.data import video_io
from vsrllm_jax.models.encoders import avhubert
from vsrllm_jax.formats import fairseq_avhubert
from vsrllm_jax.inference import scoring
from tests.helpers.numerics import assert_close

TINY_AVHUBERT = avhubert.AvHubertConfig(
    stem_channels=4, resnet_channels=(4, 8, 8, 8), resnet_blocks=(1, 1, 1, 1), hidden_dim=16,
    num_layers=1, num_heads=2, mlp_dim=32, conv_pos=4, conv_pos_groups=2)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("lrs3")
  manual = root / "manifests"
  trees = {}
  for split, stem, num, task_names, seed in (("train", "train", 24, ("vsr", "vst_es"), 0),
                                             ("validation", "valid", 4, ("vsr", "vst_es"), 1),
                                             ("test", "test", 4, ("vsr",), 2)):
    clips = lrs3_layout.synthetic_clips(num, split=split, seed=seed, task_names=task_names,
                                         max_frames=60)
    trees[split] = lrs3_layout.write_lrs3_like_tree(manual, clips, stem)
  encoder_pt = str(root / "avhubert_tiny.pt")
  fairseq_avhubert.save(encoder_pt, TINY_AVHUBERT,
                                   avhubert.init_variables(TINY_AVHUBERT))
  llm = os.path.join(common.EMBEDDED_DIR, "llm")
  config = lrs3_config.get_config(f"manifest_dir={manual},encoder={encoder_pt},llm={llm},"
                                  "steps=4")
  config.data.data_dir = str(root / "tfds")
  config.data.max_frames = 64
  config.data.frame_buckets = (48,)
  config.data.worker_count = 0
  config.data.max_label_tokens = 16
  config.batch_size = config.eval_batch_size = 8
  config.eval_every = config.checkpoint_every = config.log_every = 2
  config.decode.max_new_tokens = 6
  config.optim.schedules.main.warmup_steps = 1
  config.optim.schedules.main.hold_steps = 1
  workdir = str(root / "run")
  loop.train_and_evaluate(config, workdir)
  return workdir, trees


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_train_reports_per_task_rates_and_bounded_compilations(run):
  workdir, _ = run
  records = _records(workdir)
  merged = {k: v for r in records for k, v in r.items()}
  assert {"test/wer", "val/vsr/wer", "val/vst_es/bleu", "val/vst_es/wer"} <= set(merged)
  assert np.isfinite(merged["train/loss"])
  # Clips of 35-60 frames in buckets (48, 64): at most two train-step shapes.
  assert 1 <= merged["train/batch_shapes"] <= 2
  assert merged["data/skipped_records"] == 0


def test_lrs3_metrics_have_vsp_llm_wer_and_no_grid_slots(run):
  workdir, _ = run
  merged = {k: v for r in _records(workdir) for k, v in r.items()}
  assert {"test/wer_plain", "val/wer_plain", "val/vsr/wer_plain",
          "val/vst_es/wer_plain"} <= set(merged)
  assert not [k for k in merged if "slot_accuracy" in k]   # GRID's slots mean nothing here
  with open(os.path.join(workdir, "decode", "test.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert_close(merged["test/wer_plain"], scoring.plain_wer([r["reference"] for r in rows],
                                                           [r["hypothesis"] for r in rows]))


def test_transcribe_equals_decode_on_the_test_mp4s(run):
  workdir, trees = run
  with open(os.path.join(workdir, "decode", "test.jsonl")) as f:
    decoded = [json.loads(line)["hypothesis"] for line in f]
  videos = trees["test"]["videos"]
  texts = transcribe.transcribe(workdir, videos, task="vsr",
                                cluster_counts=trees["test"]["cluster_counts"])
  assert texts == decoded and len(texts) == 4


def test_transcribe_says_what_it_expects(run, tmp_path):
  workdir, _ = run
  face = str(tmp_path / "face.mp4")
  video_io.write_video(face, np.zeros((10, 64, 80), np.uint8))
  with pytest.raises(ValueError, match=r"80x64 frames.*mouth-cropped clips.*96x96"):
    transcribe.transcribe(workdir, [face])
  text = tmp_path / "notes.mp4"
  text.write_text("not a video")
  with pytest.raises(video_io.VideoError, match="notes.mp4"):
    transcribe.transcribe(workdir, [str(text)])


def test_raw_video_training_batches_crop_at_random_and_resume_exactly(run):
  from vsrllm_jax.run import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from vsrllm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from vsrllm_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  workdir, _ = run
  data_cfg = workdir_lib.load_config(workdir).data
  data_cfg.time_mask_prob = 0.3
  tok = tokenizer_lib.load_tokenizer(os.path.join(common.EMBEDDED_DIR, "llm"))
  source = pipeline.data_source(data_cfg, "train")
  assert source[0]["video"].shape[1:] == (96, 96, 1)       # stored 96x96, cropped to 88

  def loader():
    return iter(pipeline.make_train_loader(data_cfg, tok, global_batch_size=8, seed=1,
                                           source=source))

  it = loader()
  first = next(it)
  assert first["video"].shape[0] == 8 and first["video"].shape[2:] == (88, 88, 1)
  assert first["video"].shape[1] in (48, 64) and first["cluster_counts"].shape == (8, first["video"].shape[1])
  state = it.get_state()
  after = [next(it)["video"] for _ in range(2)]
  resumed = loader()
  resumed.set_state(state)
  for expected in after:
    np.testing.assert_array_equal(next(resumed)["video"], expected)
  # Random crops: the same clip differs between epochs (crop offset, flip or time mask).
  ids = list(first["id"])
  again = None
  for _ in range(12):
    batch = next(it)
    hits = [i for i, x in enumerate(batch["id"]) if x == ids[0]]
    if hits:
      again = batch["video"][hits[0]]
      break
  assert again is not None and not np.array_equal(again, first["video"][0])
