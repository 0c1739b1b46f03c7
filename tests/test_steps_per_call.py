"""Several optimizer steps per compiled call (`train.steps_per_call`): the numbers of one
step per call, on 1 and 8 devices and under pmap; a NaN named at its step inside a call;
one compile per call length; a stop mid-run resumes bit-identically."""

import logging
import os
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

from configs import fashion_mnist_cnn
from pipeline import config as config_lib
from pipeline import ledger
from pipeline import reporting
from pipeline import steps
from pipeline import train
from tests import workdirs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 13  # Calls of 8 steps: 8, then 2 to the eval at step 10, then 3 to the end.


def _config(steps_per_call, **overrides):
  config = fashion_mnist_cnn.get_config('smoke')
  config.data.name, config.data.path = 'synthetic', ''
  config.data.synthetic_train_size, config.data.synthetic_eval_size = 256, 64
  config.model.name = 'cnn_bn'  # BatchNorm statistics and dropout must carry through.
  config.train.num_steps, config.train.steps_per_call = NUM_STEPS, steps_per_call
  config.train.log_every_steps, config.train.eval_every_steps = 1, 10
  config.checkpoint.every_steps, config.eval.batch_size = 100, 64
  for key, value in overrides.items():
    section, name = key.split('__')
    setattr(getattr(config, section), name, value)
  return config


def _run(config, workdir):
  config_lib.validate(config, num_devices=jax.device_count(), num_processes=1)
  train.train_and_evaluate(config, str(workdir))
  return reporting.read_jsonl(str(workdir))


def _by_step(records, key):
  return {r['step']: r[key] for r in records if key in r}


@pytest.mark.parametrize('dispatched', [True, False], ids=['dispatched', 'scanned'])
@pytest.mark.parametrize('parallelism', ['jit', 'pmap'])
def test_eight_steps_per_call_give_the_losses_of_one(tmp_path, monkeypatch, caplog,
                                                     parallelism, dispatched):
  caplog.set_level(logging.INFO)
  config = _config(1)
  config.parallelism = parallelism
  one = _run(config, tmp_path / 'one')
  # 8 CPU devices in this process dispatch a call's steps one by one (train.Trainer); an
  # accelerator's devices scan them in one compiled call, which the CPU can run too.
  if not dispatched:
    monkeypatch.setattr(train, 'dispatches_steps', lambda: False)
  # Lengths 8, 2 and 3: one trace (and compile) each, however many calls.
  monkeypatch.setattr(steps, 'train_step', chex.assert_max_traces(steps.train_step, n=3))
  chex.clear_trace_counter()
  config = _config(8)
  config.parallelism = parallelism
  eight = _run(config, tmp_path / 'eight')
  assert (('Calls of 8 steps dispatch their steps one by one (8 CPU devices' in caplog.text)
          == dispatched)
  losses_one, losses_eight = _by_step(one, 'train/loss'), _by_step(eight, 'train/loss')
  assert sorted(losses_eight) == sorted(losses_one) == list(range(1, NUM_STEPS + 1))
  if dispatched:  # The compiled step of K = 1 on slices of the stacked batches.
    rtol = 0.0
    assert losses_eight == losses_one
  else:
    # On the CPU the K steps are unrolled (steps.scan_steps), and XLA compiles the 8-step
    # program's convolutions apart from the 1-step one's. Under pmap the rounding that
    # leaves grows to 1.3e-6 by step 13 (steps 1-12 within 1e-6; eval loss at step 13
    # 1.03e-6; measured 2026-12-02).
    rtol = 1e-6 if parallelism == 'jit' else 2e-6
    np.testing.assert_allclose([losses_eight[s] for s in losses_one],
                               list(losses_one.values()), rtol=rtol)
  assert sorted(_by_step(eight, 'eval/loss')) == [10, NUM_STEPS]
  np.testing.assert_allclose(list(_by_step(eight, 'eval/loss').values()),
                             list(_by_step(one, 'eval/loss').values()), rtol=rtol)
  assert ledger.read(str(tmp_path / 'eight')) == ledger.read(str(tmp_path / 'one'))


@pytest.mark.parametrize('dispatched', [True, False], ids=['dispatched', 'scanned'])
def test_a_non_finite_loss_inside_a_call_names_its_step(tmp_path, monkeypatch, dispatched):
  if not dispatched:
    monkeypatch.setattr(train, 'dispatches_steps', lambda: False)
  config = _config(8, optimizer__learning_rate=1e30, optimizer__schedule='constant')
  # Step 1's loss is of the initial weights; its update makes step 2's loss NaN.
  with pytest.raises(FloatingPointError, match=r'Non-finite training loss nan at step 2;'):
    _run(config, tmp_path)


def _env(devices):
  return dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3',
              XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')


# Long enough that a stop signalled by step 30 always lands before the end (a fast run
# could otherwise finish the call in flight and end); one eval, at the end.
STOP_STEPS = 120
FLAGS = ['--config=configs/fashion_mnist_cnn.py:smoke', '--config.data.name=synthetic',
         '--config.data.path=', '--config.data.synthetic_train_size=256',
         '--config.data.synthetic_eval_size=64', '--config.eval.batch_size=64',
         '--config.model.name=cnn_bn', '--config.train.log_every_steps=1',
         '--config.train.eval_every_steps=1000', '--config.checkpoint.every_steps=100',
         f'--config.train.num_steps={STOP_STEPS}', '--config.train.steps_per_call=8']


def _command(workdir, *extra):
  return [sys.executable, '-m', 'pipeline.main', f'--workdir={workdir}', *FLAGS, *extra]


def test_one_device_and_a_stop_mid_run_resume_bit_identically(tmp_path):
  """On 1 device: 8 steps per call give the losses of 1; SIGTERM at a random step stops
  at the end of that call, saves, and the rerun ends with the uninterrupted run's state."""
  reference, one, stopped = (str(tmp_path / n) for n in ('reference', 'one', 'stopped'))
  for workdir, extra in ((reference, ()), (one, ('--config.train.steps_per_call=1',))):
    subprocess.run(_command(workdir, *extra), cwd=ROOT, env=_env(1), check=True,
                   capture_output=True, timeout=300)
  ref_losses, one_losses = workdirs.losses(reference), workdirs.losses(one)
  assert sorted(ref_losses) == sorted(one_losses) == list(range(1, STOP_STEPS + 1))
  # The scan's body compiles to other fusions than the lone step, so rounding differs and
  # grows over the steps (BatchNorm, Adam): about 1e-7 to step 20, 1e-6 by 28 and up to
  # 1e-4 by 40 on one CPU device. The first two calls are held to 1e-6.
  first = range(1, 17)
  np.testing.assert_allclose([ref_losses[s] for s in first], [one_losses[s] for s in first],
                             rtol=1e-6)

  signal_after = int(np.random.default_rng().integers(3, 30))
  proc = subprocess.Popen(_command(stopped), cwd=ROOT, env=_env(1),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  while signal_after not in workdirs.losses(stopped):
    assert proc.poll() is None and time.time() < deadline, f'no step {signal_after}'
    time.sleep(0.02)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  saved = workdirs.committed_steps(stopped)
  print(f'SIGTERM after step {signal_after}: saved {saved}')
  assert len(saved) == 1 and signal_after <= saved[0] < STOP_STEPS, saved
  subprocess.run(_command(stopped), cwd=ROOT, env=_env(1), check=True, capture_output=True,
                 timeout=300)
  assert workdirs.losses(stopped) == ref_losses
  assert ledger.read(stopped) == ledger.read(reference)
  step, state = workdirs.final_state(stopped)
  ref_step, ref_state = workdirs.final_state(reference)
  assert step == ref_step == STOP_STEPS
  workdirs.assert_same_arrays(state, ref_state)
