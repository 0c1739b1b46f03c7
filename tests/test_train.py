"""The loop end to end on real data: losses fall, metrics land in TensorBoard, one compile."""

import glob
import os
import shutil
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from configs import fashion_mnist_cnn
from configs import rotten_tomatoes_lstm
from pipeline import config as config_lib
from pipeline import goodput
from pipeline import reporting
from pipeline import sharding
from pipeline import steps
from pipeline import train


def _smoke_run(config, workdir):
  config.train.log_every_steps = 1  # One metrics.jsonl line per step: the loss curve.
  config_lib.validate(config, num_devices=jax.device_count(), num_processes=1)
  state = train.train_and_evaluate(config, str(workdir))
  records = reporting.read_jsonl(str(workdir))
  losses = [r['train/loss'] for r in records if 'train/loss' in r]
  return state, records, losses


def test_fashion_mnist_smoke_loss_falls_and_compiles_once(tmp_path, monkeypatch):
  # The step must compile once: a retrace would mean a shape/sharding leak per step.
  monkeypatch.setattr(steps, 'train_step', chex.assert_max_traces(steps.train_step, n=1))
  chex.clear_trace_counter()
  config = fashion_mnist_cnn.get_config('smoke')
  # No implicit host<->device transfer anywhere in the loop.
  with jax.transfer_guard('disallow'):
    state, records, losses = _smoke_run(config, tmp_path)
  assert len(losses) == 30
  assert np.mean(losses[-5:]) < np.mean(losses[:5]), losses
  assert int(jax.device_get(state.step)) == 30
  evals = [r for r in records if 'eval/accuracy' in r]
  assert evals and evals[-1]['step'] == 30 and evals[-1]['eval/accuracy'] > 0.5

  # TensorBoard event files hold the same train and eval scalars.
  events = glob.glob(os.path.join(tmp_path, 'events.out.tfevents.*'))
  assert events
  acc = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={'tensors': 0})
  acc.Reload()
  tags = set(acc.Tags()['tensors'])
  assert {'train/loss', 'train/accuracy', 'train/learning_rate', 'train/grad_norm',
          'eval/loss', 'eval/accuracy'} <= tags, tags
  tb_losses = [float(tensor_util.make_ndarray(e.tensor_proto))
               for e in acc.Tensors('train/loss')]
  np.testing.assert_allclose(tb_losses, losses, rtol=1e-6)


def test_rotten_tomatoes_smoke_loss_falls(tmp_path):
  config = rotten_tomatoes_lstm.get_config('smoke')
  _, records, losses = _smoke_run(config, tmp_path)
  assert np.mean(losses[-5:]) < np.mean(losses[:5]), losses
  # The final split is scored with the model chosen on the validation split.
  final = [r for r in records if 'test/accuracy' in r]
  assert final and 0.0 < final[-1]['test/accuracy'] <= 1.0


def test_non_finite_loss_stops_naming_the_step(tmp_path):
  config = fashion_mnist_cnn.get_config('smoke')
  config.optimizer.learning_rate = 1e12
  config.optimizer.schedule = 'constant'
  config.optimizer.name = 'sgd'
  with pytest.raises(FloatingPointError, match=r'Non-finite training loss .* at step \d+'):
    train.train_and_evaluate(config, str(tmp_path))


def test_window_throughput_counts_only_the_steps_since_restart():
  """An eval between two log steps restarts the clock: the next write's examples/s must
  count the steps after the eval only, while its metric means cover the whole window."""
  now = [0.0]
  config = config_lib.base_config()
  config.train.global_batch_size = 10
  trainer = types.SimpleNamespace(config=config, parallel=sharding.Parallel(config),
                                  stacked=False, dispatched=False)
  window = train.TrainWindow(trainer, goodput.Goodput(), now=lambda: now[0])

  def push(step):
    now[0] += 1.0  # Each step takes 1 s.
    window.push(steps.TrainMetrics.single_from_model_output(
        loss=jnp.float32(step), correct=jnp.float32(1.0), learning_rate=jnp.float32(0.1),
        grad_norm=jnp.float32(1.0)), [step])

  for step in range(1, 5):
    push(step)
  window.drain()
  now[0] += 100.0  # The eval.
  window.restart()
  for step in range(5, 7):
    push(step)
  scalars = window.flush(6)
  assert scalars['perf/examples_per_sec'] == pytest.approx(10.0)  # 2 steps of 10 in 2 s.
  assert scalars['train/loss'] == pytest.approx(3.5)  # The mean of steps 1..6.


def _early_stopping_config(num_steps):
  """A tiny run whose eval loss can never improve by min_delta: it stops `patience` evals
  after the first, at step 2 * (patience + 1)."""
  config = fashion_mnist_cnn.get_config('smoke')
  config.data.name, config.data.path = 'synthetic', ''
  config.data.synthetic_train_size, config.data.synthetic_eval_size = 256, 64
  config.model.name = 'mlp'
  config.optimizer.schedule = 'constant'  # Duration changes are tested on their own.
  config.train.num_steps = num_steps
  config.train.log_every_steps = 1
  config.train.eval_every_steps = 2
  config.checkpoint.every_steps = 2
  config.eval.batch_size = 64
  config.early_stopping.metric = 'eval/loss'
  config.early_stopping.patience = 2
  config.early_stopping.min_delta = 1e9
  config_lib.validate(config, num_devices=jax.device_count(), num_processes=1)
  return config


def _logged_steps(workdir):
  return sorted(r['step'] for r in reporting.read_jsonl(str(workdir)) if 'train/loss' in r)


def _checkpoint_steps(workdir):
  return sorted(int(n) for n in os.listdir(os.path.join(workdir, 'checkpoints')) if n.isdigit())


def test_early_stopped_run_rerun_does_not_train_further(tmp_path, caplog):
  workdir = str(tmp_path)
  state = train.train_and_evaluate(_early_stopping_config(20), workdir)
  assert int(jax.device_get(state.step)) == 6  # Best at 2, no improvement at 4 and 6.
  assert _logged_steps(workdir) == list(range(1, 7))
  checkpoints = _checkpoint_steps(workdir)
  assert checkpoints[-1] == 6
  with caplog.at_level('INFO'):
    state = train.train_and_evaluate(_early_stopping_config(20), workdir)
  assert int(jax.device_get(state.step)) == 6
  assert _logged_steps(workdir) == list(range(1, 7))  # Nothing trained, nothing logged.
  assert _checkpoint_steps(workdir) == checkpoints
  assert 'stopped early at step 6' in caplog.text, caplog.text[-2000:]


def test_resume_keeps_early_stopping_patience(tmp_path):
  """A run resumed between two evals stops where the uninterrupted one does (step 6): the
  evals without improvement before the interruption still count."""
  workdir = str(tmp_path)
  train.train_and_evaluate(_early_stopping_config(4), workdir)  # Best at 2, none at 4.
  assert _checkpoint_steps(workdir)[-1] == 4
  state = train.train_and_evaluate(_early_stopping_config(20), workdir)
  assert int(jax.device_get(state.step)) == 6, 'patience was reset by the resume'
  assert _logged_steps(workdir) == list(range(1, 7))


def _learning_rates(workdir):
  """step -> learning rate; a step logged twice (redone after a restore) keeps its last."""
  return {r['step']: r['train/learning_rate'] for r in reporting.read_jsonl(str(workdir))
          if 'train/learning_rate' in r}


def test_duration_change_on_resume_keeps_the_schedule(tmp_path):
  """train.num_steps may change on resume; the warmup-cosine schedule keeps the length the
  run started with, so the learning rate of every resumed step is the uninterrupted run's."""
  config = _early_stopping_config(12)
  config.early_stopping.metric = ''
  config.optimizer.schedule = 'warmup_cosine'  # Warmup 5 steps, then cosine to step 12.
  config.checkpoint.max_to_keep = 10
  reference = str(tmp_path / 'uninterrupted')
  train.train_and_evaluate(config, reference)
  ref_lrs = _learning_rates(reference)
  assert sorted(ref_lrs) == list(range(1, 13))
  assert len(set(ref_lrs.values())) == 12  # Changes every step: a shift would show.

  for num_steps in (9, 16):  # Shortened, then extended past the schedule's end.
    workdir = str(tmp_path / f'resumed_{num_steps}')
    shutil.copytree(reference, workdir)
    # What a run killed right after saving step 6 leaves: no later checkpoint.
    for step in _checkpoint_steps(workdir):
      if step > 6:
        shutil.rmtree(os.path.join(workdir, 'checkpoints', str(step)))
    config.train.num_steps = num_steps
    state = train.train_and_evaluate(config, workdir)
    assert int(jax.device_get(state.step)) == num_steps
    lrs = _learning_rates(workdir)
    for step in range(7, min(num_steps, 12) + 1):
      assert lrs[step] == ref_lrs[step], (num_steps, step, lrs[step], ref_lrs[step])
    for step in range(13, num_steps + 1):  # Past its end the schedule holds its final lr.
      assert lrs[step] == pytest.approx(0.0), (step, lrs[step])
