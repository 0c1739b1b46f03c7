"""Exit paths of a training run, end to end with real processes: a save started just
before a crash commits, a stop during eval or start-up exits at once, the exit codes.

Each run is `python -m pipeline.main` in a subprocess (1 process x 8 fake CPU devices,
or 2 x 4 through launch/local.sh) on a small synthetic dataset.
"""

import os
import signal
import subprocess
import sys
import time


from pipeline import exits
from tests import workdirs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = 'configs/fashion_mnist_cnn.py:smoke'
DATA = ['--config.data.name=synthetic', '--config.data.path=',
        '--config.data.synthetic_train_size=256', '--config.train.log_every_steps=1']
# Adam's first update moves every weight by about the learning rate, so step 1 trains
# (its loss is of the initial weights) and step 2's loss is NaN; checkpoint at every step:
# step 1's save is in flight when the NaN of step 2 stops the run.
DIVERGING = [*DATA, '--config.data.synthetic_eval_size=128', '--config.eval.batch_size=128',
             '--config.checkpoint.every_steps=1', '--config.optimizer.schedule=constant',
             '--config.optimizer.learning_rate=1e30']
# 16384 eval examples in batches of 8: 2048 eval batches, about 40 s on 2 CPU cores.
SLOW_EVAL = ['--config.data.synthetic_eval_size=16384', '--config.eval.batch_size=8']
FAST_EVAL = ['--config.data.synthetic_eval_size=16384', '--config.eval.batch_size=2048']
STEPS = [*DATA, '--config.train.num_steps=6', '--config.checkpoint.every_steps=100']


def _env(devices=8):
  return dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3', PYTHON=sys.executable,
              XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')


def _command(workdir, *flags):
  return [sys.executable, '-m', 'pipeline.main', f'--config={CONFIG}',
          f'--workdir={workdir}', *flags]


def test_nan_right_after_a_save_commits_that_save_one_process(tmp_path):
  workdir = str(tmp_path)
  proc = subprocess.run(_command(workdir, *DIVERGING), cwd=ROOT, env=_env(),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == exits.NON_FINITE_LOSS, proc.stderr[-3000:]
  assert 'Non-finite training loss nan at step 2' in proc.stderr
  assert 'Checkpoint step 1 committed before exiting on FloatingPointError' in proc.stderr
  assert workdirs.committed_steps(workdir) == [1]


def test_nan_right_after_a_save_commits_that_save_two_processes(tmp_path):
  workdir = str(tmp_path)
  proc = subprocess.run(
      ['bash', 'launch/local.sh', '--config', CONFIG, '--workdir', workdir,
       '--num_processes', '2', '--devices_per_process', '4', '--', *DIVERGING],
      cwd=ROOT, env=_env(4), capture_output=True, text=True, timeout=400)
  # The hook's os._exit carries the same code; local.sh exits with the first failure's.
  assert proc.returncode == exits.NON_FINITE_LOSS, proc.stderr[-3000:]
  for i in range(2):
    with open(os.path.join(workdir, 'logs', f'process_{i}.log'), encoding='utf-8') as f:
      log = f.read()
    assert 'Checkpoint step 1 committed before exiting on FloatingPointError' in log, log[-3000:]
  assert workdirs.committed_steps(workdir) == [1]


def _wait_for(predicate, proc, what, timeout=240):
  deadline = time.time() + timeout
  while not predicate():
    assert proc.poll() is None, f'the run exited before {what}'
    assert time.time() < deadline, f'no {what} after {timeout} s'
    time.sleep(0.05)


def _run(workdir, *flags):
  """A run to its end."""
  subprocess.run(_command(workdir, *flags), cwd=ROOT, env=_env(), check=True,
                 capture_output=True, timeout=300)


def _sigterm_when(ready, what, log_path, command, settle_s=0.0):
  """Runs `command` logging to `log_path`, sends SIGTERM `settle_s` after `ready()` holds;
  returns (the process, seconds from the signal to its exit, its log)."""
  with open(log_path, 'w', encoding='utf-8') as log:
    proc = subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=log,
                            stderr=subprocess.STDOUT)
    _wait_for(ready, proc, what)
    time.sleep(settle_s)
    proc.send_signal(signal.SIGTERM)
    signalled = time.time()
    proc.wait(timeout=60)
    took = time.time() - signalled
  with open(log_path, encoding='utf-8') as f:
    return proc, took, f.read()


# One process: with several, a stop lands at the step boundary after the eval (see
# pipeline/preemption.py); the 4-process stop is in tests/test_multiprocess_train.py.
def test_sigterm_during_a_long_eval_exits_at_once_and_resumes_bit_identically(tmp_path):
  reference, workdir = str(tmp_path / 'reference'), str(tmp_path / 'stopped')
  every_3 = ['--config.train.eval_every_steps=3']
  _run(reference, *STEPS, *FAST_EVAL, *every_3)

  # Step 3's losses are written just before its eval starts; 3 s on is well inside the
  # eval (2048 batches).
  proc, took, out = _sigterm_when(lambda: 3 in workdirs.losses(workdir), 'step 3',
                                  str(tmp_path / 'stopped.log'),
                                  _command(workdir, *STEPS, *SLOW_EVAL, *every_3), settle_s=3)
  assert proc.returncode == 0, out[-3000:]
  assert 'Stop requested during the eval of step 3: eval abandoned' in out, out[-3000:]
  print(f'SIGTERM during eval: exited {took:.2f} s after the signal')
  assert took < 10, f'exited {took:.1f} s after SIGTERM'
  assert workdirs.committed_steps(workdir) == [3]
  assert max(workdirs.losses(workdir)) == 3

  # The rerun (a fast eval: eval.batch_size may change on resume) first runs the
  # abandoned eval of step 3, then finishes as if never stopped.
  _run(workdir, *STEPS, *FAST_EVAL, *every_3)
  assert workdirs.losses(workdir) == workdirs.losses(reference)
  evals = {r['step']: r['eval/loss'] for r in workdirs.records(workdir) if 'eval/loss' in r}
  assert evals == {r['step']: r['eval/loss'] for r in workdirs.records(reference)
                   if 'eval/loss' in r}
  step, state = workdirs.final_state(workdir)
  ref_step, ref_state = workdirs.final_state(reference)
  assert step == ref_step == 6
  workdirs.assert_same_arrays(state, ref_state)


def test_sigterm_during_start_up_exits_cleanly_writing_no_checkpoint(tmp_path):
  workdir = str(tmp_path / 'run')
  log_path = str(tmp_path / 'run.log')

  def started():
    with open(log_path, encoding='utf-8') as f:
      return 'Training 6 steps from step 0' in f.read()

  # Logged after the restore, before the summaries and the compile of the train step.
  proc, took, out = _sigterm_when(started, 'the start-up log line', log_path,
                                  _command(workdir, *STEPS, *FAST_EVAL))
  assert proc.returncode == 0, out[-3000:]
  assert 'during start-up: exiting, nothing saved' in out, out[-3000:]
  assert workdirs.committed_steps(workdir) == []
  assert not workdirs.losses(workdir)
  print(f'SIGTERM during start-up: exited {took:.2f} s after the signal')
  assert took < 10, f'exited {took:.1f} s after SIGTERM'
