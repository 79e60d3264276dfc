"""The training run: train, validate, checkpoint, then test the best checkpoint.

A run starts from its own latest checkpoint when it has one (the state and the
data iterator restored, so it sees exactly the batches it would have seen),
else from the pretrained weights its config names. SIGTERM saves a checkpoint
after the current step and ends the run cleanly.
"""
from __future__ import annotations

import logging
import os
import signal

import jax

from vsrllm_jax import sharding
from vsrllm_jax.data import examples
from vsrllm_jax.data.batch import model_inputs
from vsrllm_jax.inference import evaluation, predictor, scoring
from vsrllm_jax.models import lora
from vsrllm_jax.run import checkpoint, metrics, pretrained, throughput
from vsrllm_jax.run import setup as setup_lib
from vsrllm_jax.run import state as state_lib
from vsrllm_jax.run import workdir as workdir_lib
from vsrllm_jax.run.data import RunData
from vsrllm_jax.training import optim
from vsrllm_jax.training import step as step_lib


class _Preemption:
  """Turns SIGTERM into a flag the loop checks after each step."""

  def __init__(self):
    self.requested = False
    signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del frame
    logging.warning("signal %d: saving a checkpoint after this step, then exiting", signum)
    self.requested = True


def _initial_state(setup, ckpts, workdir):
  """(layout, state, step): the latest checkpoint's state in the layout of its step, else
  a fresh one from pretrained weights."""
  start = ckpts.latest_step()
  checkpoint.log_resume(start, workdir)
  layout = state_lib.layout(setup.model, setup.config, setup.mesh, step=start or 0)
  if start is not None:
    state, _ = ckpts.restore(start, layout.abstract())
    return layout, state, int(start)
  params, model_state = pretrained.load(setup.config, setup.mesh)
  return layout, state_lib.create(setup.model, setup.config, layout, pretrained_params=params,
                                  pretrained_model_state=model_state), 0


def _step_flops(setup, layout) -> throughput.StepFlops:
  config, model = setup.config, setup.model
  make_counting_step = None
  if config.get("log_hfu", True):
    counting = config.copy_and_resolve_references()
    with counting.unlocked():
      counting.grad_accum_steps = 1   # XLA would count a micro-batch loop's body once
    make_counting_step = lambda: step_lib.make_train_step(throughput.counting_model(model),
                                                          counting, layout)
  # LoRA adapters train no LLM kernel: the kernels' weight gradients are not computed
  # (the adapters' own rank-r matmuls are left out of the analytic count).
  llm_trained = any(path[0] == "llm" and label is not optim.FROZEN
                    and path[-1] not in lora.ADAPTER_NAMES
                    for path, label in layout.labels.items())
  return throughput.StepFlops(model, layout.abstract(), llm_trained=llm_trained,
                              make_counting_step=make_counting_step)


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
  """The whole run: train, validate, checkpoint, then test on the best checkpoint."""
  examples.reset_skipped_record_count()   # data/skipped_records counts this run's records
  setup = setup_lib.make(config)
  config, tok, mesh = setup.config, setup.tokenizer, setup.mesh
  workdir_lib.write_run_info(workdir, config)
  ckpts = checkpoint.Checkpoints(workdir, config.keep_checkpoints)
  layout, state, start = _initial_state(setup, ckpts, workdir)
  data = RunData(setup, state.params, state.model_state)
  data.prepare(("train", "validation", "test"))   # before a train step donates the state
  data_iter = iter(data.train_loader())
  if start:
    ckpts.restore_data(start, data_iter)

  step_lib.check_loss_weights(setup.model, layout, config)
  step_lib.check_trainable_reachable(setup.model, layout, config)
  step_fn = step_lib.make_train_step(setup.model, config, layout)
  predict = predictor.make_predictor(setup.model, config, eos_id=setup.eos_ids,
                                     pad_id=tok.pad_token_id, mesh=mesh)
  step_flops = _step_flops(setup, layout)
  writer = metrics.MetricWriter(workdir, is_main=jax.process_index() == 0)
  progress = metrics.Progress(config.total_steps, start)
  preemption = _Preemption()
  averages = metrics.StepAverages()   # on device until a log step
  meter = throughput.Meter(mesh.size, throughput.peak_flops_per_device(
      mesh.devices.flat[0], config.get("peak_flops_per_device", 0.0)))

  def validate(step):
    rates, _ = evaluation.evaluate(predict, state.params, state.model_state,
                                   data.eval_batches("validation", config.max_eval_batches),
                                   mesh, tok, eos_id=setup.eos_ids)
    writer.write_scalars(step, _rate_scalars("val", rates))
    if ckpts.save_best(step, state, rates["wer"]):
      logging.info("step %d: new best val/wer %.4f", step, rates["wer"])

  shapes = set()  # distinct (phase, batch shape) = train-step compilations (length buckets)
  profile = metrics.ProfileWindow(config.get("profile_steps", ()),
                                  os.path.join(workdir, "profile"))
  for step in range(start, config.total_steps):
    profile.before(step)
    inputs = model_inputs(next(data_iter))
    shapes_before = len(shapes)
    shapes.add((layout.until, tuple(sorted((k, v.shape) for k, v in inputs.items()))))
    global_inputs = sharding.global_batch(inputs, mesh)
    if len(shapes) > shapes_before:   # a new shape: FLOP count and compilation are not timed
      meter.pause()
      step_flops(global_inputs)
      state, step_metrics = step_fn(state, global_inputs)
      jax.block_until_ready(step_metrics)
      meter.resume()
    else:
      meter.count(step_flops(global_inputs))
      state, step_metrics = step_fn(state, global_inputs)
    averages.add(step_metrics)
    done = step + 1
    profile.after(step, step_metrics)
    if done == layout.until:   # config.optim.freeze_finetune_updates: the encoder trains now
      layout, state = state_lib.next_phase(setup.model, config, layout, state)
      step_fn = step_lib.make_train_step(setup.model, config, layout)
      step_flops = _step_flops(setup, layout)
      logging.info("step %d: the encoder trains from now on (freeze_finetune_updates)", done)
    if done % config.log_every == 0 or done == config.total_steps:
      summary = averages.report()
      summary.update(progress(done))
      summary.update(meter.report())
      summary["data/skipped_records"] = examples.skipped_record_count()
      summary["train/batch_shapes"] = len(shapes)
      writer.write_scalars(done, summary)
    meter.pause()   # evaluation and checkpoints are not step time
    if done % config.eval_every == 0 or done == config.total_steps:
      validate(done)
    if done % config.checkpoint_every == 0 or done == config.total_steps or preemption.requested:
      ckpts.save(done, state, data_iter)
    meter.resume()
    if preemption.requested:
      profile.close()
      writer.flush()
      ckpts.close()
      logging.warning("checkpoint saved at step %d after SIGTERM; exiting", done)
      return {"preempted_at": done}

  profile.close()
  result = _test(setup, layout, ckpts, state, data, predict, writer, workdir)
  writer.flush()
  writer.close()
  ckpts.close()
  return result


def _test(setup, layout, ckpts, state, data, predict, writer, workdir) -> dict[str, float]:
  """Final evaluation on the test split with the best checkpoint (by validation WER)."""
  config = setup.config
  best_step = ckpts.best.best_step()
  params, model_state = state.params, state.model_state
  if best_step is not None:
    weights, _ = ckpts.restore_weights(best_step, layout.weights(), best=True)
    params, model_state = weights["params"], weights["model_state"]
  rates, rows = evaluation.evaluate(predict, params, model_state, data.eval_batches("test"),
                                    setup.mesh, setup.tokenizer, eos_id=setup.eos_ids)
  extra = scoring.dataset_metrics(config, rows)   # e.g. GRID slot accuracy
  writer.write_scalars(config.total_steps, {**_rate_scalars("test", rates),
                                            "test/best_step": best_step or config.total_steps,
                                            **{f"test/{k}": v for k, v in extra.items()}})
  evaluation.write_decodes(workdir, "test", rows)
  logging.info("test (best step %s): WER %.4f (VSP-LLM's %.4f), CER %.4f over %d clips",
               best_step, rates["wer"], rates["wer_plain"], rates["cer"], rates["num_examples"])
  return {"test/wer": rates["wer"], "test/cer": rates["cer"]}


_RATES = ("wer", "wer_plain", "cer")   # written for every split (wer_plain: VSP-LLM's WER)


def _rate_scalars(prefix: str, rates: dict) -> dict[str, float]:
  """A split's written rates: ``{prefix}/wer`` (ours), ``/wer_plain`` (VSP-LLM's), ``/cer``,
  and ``{prefix}/{task}/{rate}`` (also BLEU) of a multi-task split (LRS3 VSR/VST)."""
  scalars = {f"{prefix}/{k}": rates[k] for k in _RATES}
  scalars.update({f"{prefix}/{k}": v for k, v in rates.items()
                  if "/" in k and k.rsplit("/", 1)[1] in _RATES + ("bleu",)})
  return scalars
