"""The loop end to end on real data: losses fall, metrics land in TensorBoard, one compile."""

import glob
import os
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
  trainer = types.SimpleNamespace(config=config, parallel=sharding.Parallel(config))
  window = train.TrainWindow(trainer, goodput.Goodput(), now=lambda: now[0])

  def push(step):
    now[0] += 1.0  # Each step takes 1 s.
    window.push(steps.TrainMetrics.single_from_model_output(
        loss=jnp.float32(step), correct=jnp.float32(1.0), learning_rate=jnp.float32(0.1),
        grad_norm=jnp.float32(1.0)), step)

  for step in range(1, 5):
    push(step)
  window.drain()
  now[0] += 100.0  # The eval.
  window.restart()
  for step in range(5, 7):
    push(step)
  scalars = window.flush()
  assert scalars['perf/examples_per_sec'] == pytest.approx(10.0)  # 2 steps of 10 in 2 s.
  assert scalars['train/loss'] == pytest.approx(3.5)  # The mean of steps 1..6.
