"""The run's metric sinks: on-device step averages, metrics.jsonl and TensorBoard
event files (tensorboardX), read back with tensorboard's own reader."""
import json

import jax.numpy as jnp
from tensorboard.backend.event_processing import event_accumulator

from tests.helpers.numerics import assert_close
from vsrllm_jax.run import metrics


def test_step_averages_are_per_name_means_since_the_last_report():
  averages = metrics.StepAverages()
  for loss, norm in ((1.0, 10.0), (2.0, 30.0), (4.5, 20.0)):
    averages.add({"train/loss": jnp.float32(loss), "train/grad_norm": jnp.float32(norm)})
  report = averages.report()
  assert set(report) == {"train/loss", "train/grad_norm"}
  assert_close(report["train/loss"], 2.5, rtol=1e-6)
  assert_close(report["train/grad_norm"], 20.0, rtol=1e-6)
  assert averages.report() == {}                      # a report starts afresh
  averages.add({"train/loss": jnp.float32(7.0)})
  assert averages.report() == {"train/loss": 7.0}


def test_metric_writer_writes_jsonl_and_tensorboard(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path))
  writer.write_scalars(10, {"train/loss": 1.25, "val/wer": jnp.float32(0.5)})
  writer.write_scalars(20, {"train/loss": 0.75})
  writer.close()
  records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert records == [{"step": 10, "train/loss": 1.25, "val/wer": 0.5},
                     {"step": 20, "train/loss": 0.75}]
  events = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
  events.Reload()
  assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(10, 1.25), (20, 0.75)]
  assert [(e.step, e.value) for e in events.Scalars("val/wer")] == [(10, 0.5)]


def test_only_the_main_process_writes(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path / "w"), is_main=False)
  writer.write_scalars(1, {"train/loss": 1.0})
  writer.close()
  assert not (tmp_path / "w").exists()
