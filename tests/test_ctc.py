"""The CTC head and loss, its character targets, and per-sample VSP-LLM deduplication."""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers.numerics import assert_close
from tests.helpers.tiny import random_batch, tiny_config
from vsrllm_jax import sharding
from vsrllm_jax.data import batch as batch_lib
from vsrllm_jax.run import state as state_lib
from vsrllm_jax.training import step as step_lib
from vsrllm_jax.data import examples
from vsrllm_jax.data import tokenizer as tokenizer_lib
from vsrllm_jax.models import build as build_lib
from vsrllm_jax.models import ctc
from vsrllm_jax.models.vsr_model import VSRModel


def _fast_compile_options() -> dict:
  """XLA:CPU options that cut compile time on tiny graphs; {} where XLA lacks them."""
  options = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
  try:
    jax.jit(lambda x: x + 1, compiler_options=options)(jnp.zeros(()))
  except Exception:  # noqa: BLE001 - an unknown option name
    return {}
  return options


jit = functools.partial(jax.jit, compiler_options=_fast_compile_options())


def brute_force_nll(log_probs: np.ndarray, label: list[int]) -> float:
  """-log sum over every T-length path that collapses (repeats, then blanks) to label."""
  t, k = log_probs.shape
  total = 0.0
  for path in itertools.product(range(k), repeat=t):
    collapsed = [c for i, c in enumerate(path) if i == 0 or c != path[i - 1]]
    if [c for c in collapsed if c != ctc.BLANK_ID] == label:
      total += np.exp(sum(log_probs[i, c] for i, c in enumerate(path)))
  return -np.log(total)


@pytest.mark.parametrize("label", [[1, 2], [1, 1], [2, 1]])
def test_ctc_loss_equals_brute_force_path_sum(label):
  rng = np.random.default_rng(len(label) + label[0] * 3 + label[1])
  logits = rng.normal(size=(1, 4, 3)).astype(np.float32) * 2
  log_probs = np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), -1))[0]
  want = brute_force_nll(log_probs.astype(np.float64), label) / len(label)
  got = ctc.ctc_loss(logits, np.ones((1, 4), bool), np.array([label]), np.ones((1, 2), bool))
  assert_close(float(got), want, rtol=1e-5)


def test_padding_beyond_the_masks_changes_nothing():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, ctc.VOCAB_SIZE)).astype(np.float32)
  labels, paddings = ctc.encode_text(["ab", "c"], 3)
  logit_mask = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], bool)
  base = ctc.ctc_loss(logits, logit_mask, labels, paddings == 0)
  noisy = logits.copy()
  noisy[~logit_mask] = rng.normal(size=noisy[~logit_mask].shape) * 50
  noisy_labels = np.where(paddings == 0, labels, rng.integers(1, ctc.VOCAB_SIZE, labels.shape))
  padded = ctc.ctc_loss(noisy, logit_mask, noisy_labels, paddings == 0)
  np.testing.assert_allclose(float(padded), float(base), rtol=1e-6)
  # Wider label and logit buffers with the same real entries: the same loss.
  wide_labels, wide_pad = ctc.encode_text(["ab", "c"], 6)
  wide = np.concatenate([logits, rng.normal(size=(2, 3, ctc.VOCAB_SIZE))], 1).astype(np.float32)
  wide_mask = np.pad(logit_mask, ((0, 0), (0, 3)))
  np.testing.assert_allclose(float(ctc.ctc_loss(wide, wide_mask, wide_labels, wide_pad == 0)),
                             float(base), rtol=1e-6)
  # A filler row (example_mask False) drops out of the mean.
  one = ctc.ctc_loss(logits[:1], logit_mask[:1], labels[:1], paddings[:1] == 0)
  np.testing.assert_allclose(
      float(ctc.ctc_loss(logits, logit_mask, labels, paddings == 0, np.array([True, False]))),
      float(one), rtol=1e-6)


def test_encode_text_round_trip_and_errors():
  texts = ["bin blue at f two now", "it's 42", "", "Set Red"]
  labels, paddings = ctc.encode_text(texts, 24)
  assert labels.shape == paddings.shape == (4, 24) and labels.dtype == np.int32
  assert ctc.decode_labels(labels, paddings == 0) == [t.lower() for t in texts]
  assert labels[0, 0] == 2 and labels[1, 2] == 27 and labels[1, 4] == 28  # 'b', "'", ' '
  assert labels[1, 5] == 33 and labels[1, 6] == 31                         # '4', '2'
  assert (labels[paddings == 1] == ctc.BLANK_ID).all() and ctc.VOCAB_SIZE == 39
  with pytest.raises(ValueError, match=r"\['!'\]"):
    ctc.encode_text(["hi!"], 8)
  with pytest.raises(ValueError, match="data.ctc_max_chars=3"):
    ctc.encode_text(["four"], 3)


def test_pipeline_adds_character_targets(tmp_path):
  cfg = tiny_config().data
  cfg.ctc_max_chars = 24
  tok = tokenizer_lib.build_word_tokenizer(tmp_path, (cfg.instruction,))
  cfg.max_instruction_tokens = 16
  cfg.max_label_tokens = 12
  encoder = examples.ExampleEncoder(cfg, tok)
  frames = np.zeros((3, cfg.image_size, cfg.image_size, 1), np.uint8)
  example = encoder(0, {"id": "x", "text": "set red at b two now", "video": frames})
  assert example["ctc_labels"].shape == (24,) and example["ctc_label_mask"].sum() == 20
  assert ctc.decode_labels(example["ctc_labels"][None], example["ctc_label_mask"][None]) == [
      "set red at b two now"]
  filler = encoder.filler()
  assert filler["ctc_labels"].shape == (24,) and not filler["ctc_label_mask"].any()
  cfg.ctc_max_chars = 0
  assert "ctc_labels" not in examples.ExampleEncoder(cfg, tok)(0, {
      "id": "x", "text": "set red", "video": frames})


CTC_TEXTS = ["ab", "set", "a b", "it's", "", "x1", "bin", "c"]


def _ctc_config(projector: str, source: str):
  config = tiny_config(projector)
  config.ctc.enabled = True
  config.ctc.source = source
  config.data.ctc_max_chars = 5
  config.loss_weights.ctc = 0.3
  return config


def _model(config):
  return build_lib.build_model(config)


def _features_batch(config, model, seed=0):
  batch = random_batch(config, config.batch_size, seed)
  rng = np.random.default_rng(seed)
  width = model.encoder_config.hidden_dim
  batch["features"] = rng.normal(size=batch["video"].shape[:2] + (width,)).astype(np.float32)
  batch["features_mask"] = batch.pop("video_mask")
  del batch["video"]
  if config.data.ctc_max_chars:
    labels, paddings = ctc.encode_text(CTC_TEXTS, config.data.ctc_max_chars)
    batch.update(ctc_labels=labels, ctc_label_mask=paddings == 0)
  return batch


@pytest.fixture
def fast_jit(monkeypatch):
  """Every jax.jit in the test compiles with the fast options (init compiles ~6x faster)."""
  monkeypatch.setattr(jax, "jit", functools.partial(jax.jit,
                                                    compiler_options=_fast_compile_options()))


@pytest.mark.usefixtures("fast_jit")
@pytest.mark.parametrize("source", ["encoder", "projector"])
def test_train_step_with_the_ctc_loss(source):
  config = _ctc_config("mlp", source)
  model = _model(config)
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  layout = state_lib.layout(model, config, mesh)
  state = state_lib.create(model, config, layout)
  batch = sharding.global_batch(_features_batch(config, model), mesh)
  assert step_lib.check_loss_weights(model, layout, config, batch) == ["ctc", "lm"]
  assert step_lib.check_loss_weights(model, layout, config) == ["ctc", "lm"]   # as a run does
  step = step_lib.make_train_step(model, config, layout)
  before = jax.device_get(state.params)
  new_state, metrics = step(state, batch)
  after = jax.device_get(new_state.params)
  ctc_loss = float(metrics["train/ctc"])
  assert np.isfinite(ctc_loss) and ctc_loss > 0
  assert float(metrics["train/loss"]) == pytest.approx(
      float(metrics["train/lm"]) + 0.3 * ctc_loss, rel=1e-5)
  head = before["ctc_head"]["out"]["kernel"]
  assert not np.array_equal(head, after["ctc_head"]["out"]["kernel"])
  assert head.shape[-1] == ctc.VOCAB_SIZE
  width = model.encoder_config.hidden_dim if source == "encoder" else config.llm.hidden_dim
  assert head.shape[0] == width
  # Training without character targets is an error that names the data key.
  no_targets = {k: v for k, v in batch.items() if not k.startswith("ctc_")}
  with pytest.raises(ValueError, match="data.ctc_max_chars"):
    step_lib.check_loss_weights(model, layout, config, no_targets)


def test_projector_source_needs_a_sequence_preserving_projector():
  config = _ctc_config("multiscale_contrastive", "projector")
  model = _model(config)
  with pytest.raises(ValueError, match="ctc.source"):
    jax.eval_shape(lambda: model.init(jax.random.key(0), batch_lib.dummy_batch(config)))
  config.ctc.source = "llm"
  with pytest.raises(ValueError, match="ctc.source"):
    jax.eval_shape(lambda: _model(config).init(jax.random.key(0),
                                               batch_lib.dummy_batch(config)))


def _reference_runs(tokens, mask, counts):
  """numpy: per row, slot k = mean of the real frames of run k; mask = run has a real frame."""
  out, out_mask = np.zeros_like(tokens), np.zeros(mask.shape, bool)
  for b in range(tokens.shape[0]):
    start = 0
    for k, n in enumerate(counts[b]):
      frames = [f for f in range(start, start + n) if f < tokens.shape[1] and mask[b, f]]
      if frames:
        out[b, k], out_mask[b, k] = tokens[b, frames].mean(0), True
      start += n
  return out, out_mask


@pytest.mark.parametrize("projector", ["linear", "mlp", "pevl_adapter"])
def test_deduplication_averages_runs_per_sample(projector):
  config = tiny_config(projector)
  model = build_lib.build_model(config)
  batch = _features_batch(config, model)
  batch["features_mask"][:, :9] = True                    # every row has >= 9 real frames
  t = config.data.max_frames
  counts = np.zeros((config.batch_size, t), np.int32)
  for b in range(config.batch_size):                      # different run lengths per row
    runs = np.random.default_rng(b).integers(1, 4, t)
    runs = runs[:np.searchsorted(np.cumsum(runs), t - b % 3) + 1]
    counts[b, :len(runs)] = runs
  assert not (counts[1] == counts[0]).all()
  variables = jit(lambda b: model.init(jax.random.key(0), b))(batch_lib.dummy_batch(config))
  project = jit(lambda v, b: model.apply(v, b, train=False, method=VSRModel.project)[1:])
  plain, plain_mask = map(np.asarray, project(variables, batch))
  deduped, deduped_mask = map(np.asarray, project(variables, dict(batch, cluster_counts=counts)))
  assert deduped.shape == plain.shape and deduped_mask.shape == plain_mask.shape  # static
  want, want_mask = _reference_runs(plain, plain_mask, counts)
  np.testing.assert_array_equal(deduped_mask, want_mask)
  np.testing.assert_allclose(deduped[want_mask], want[want_mask], rtol=1e-5, atol=1e-5)
  # Row 1 is averaged with its own counts, not row 0's (the PyTorch original's bug).
  row0_counts = np.broadcast_to(counts[:1], counts.shape)
  wrong, wrong_mask = _reference_runs(plain, plain_mask, row0_counts)
  assert not np.array_equal(deduped_mask[1], wrong_mask[1]) or not np.allclose(
      deduped[1][wrong_mask[1]], wrong[1][wrong_mask[1]])
