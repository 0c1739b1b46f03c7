"""Real multi-process training on one machine: 2 processes x 4 fake CPU devices (gloo),
launched with launch/local.sh, the same code path as a pod."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from pipeline import ledger

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ['--config.train.log_every_steps=1', '--config.train.eval_every_steps=10',
         '--config.checkpoint.every_steps=5', '--config.train.num_steps=10',
         '--config.optimizer.warmup_steps=3', '--config.eval.batch_size=1000']
CONFIG = 'configs/fashion_mnist_cnn.py:smoke'


def _env(devices):
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3', PYTHON=sys.executable)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  return env


def _two_processes(workdir, *extra):
  proc = subprocess.run(
      ['bash', 'launch/local.sh', '--config', CONFIG, '--workdir', workdir,
       '--num_processes', '2', '--devices_per_process', '4', '--', *FLAGS, *extra],
      cwd=ROOT, env=_env(4), capture_output=True, text=True, timeout=400)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def _one_process(workdir, *extra):
  proc = subprocess.run(
      [sys.executable, '-m', 'pipeline.main', f'--config={CONFIG}', f'--workdir={workdir}',
       *FLAGS, *extra], cwd=ROOT, env=_env(8), capture_output=True, text=True, timeout=400)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stderr


def _jsonl_records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def _jsonl_losses(workdir):
  return {r['step']: r['train/loss'] for r in _jsonl_records(workdir) if 'train/loss' in r}


def _logged_losses(log_text):
  """step -> train/loss as CLU's LoggingWriter prints it (every process logs)."""
  return {int(m.group(1)): m.group(2) for m in
          re.finditer(r'\[(\d+)\] .*?train/loss=([0-9.e+-]+)', log_text)}


@pytest.fixture(scope='module')
def one_process_run(tmp_path_factory):
  """The reference: 1 process x 8 devices under jit, 10 steps. Tests that resume it copy it."""
  workdir = str(tmp_path_factory.mktemp('one_process') / 'run')
  _one_process(workdir)
  return workdir, _jsonl_losses(workdir)


def _resume_copy(source, destination):
  shutil.copytree(source, destination)
  return destination


def test_two_processes_match_one_and_checkpoints_cross_resume(tmp_path, one_process_run):
  two = str(tmp_path / 'two')
  one, one_losses = one_process_run
  # dcn_data=2: the data axis laid over the two processes (the hybrid mesh path).
  _two_processes(two, '--config.mesh.dcn_data=2')
  logs = [open(os.path.join(two, 'logs', f'process_{i}.log'), encoding='utf-8').read()
          for i in range(2)]
  assert 'process 1/2, local devices 4, global devices 8' in logs[1]
  per_process = [_logged_losses(text) for text in logs]
  assert sorted(per_process[0]) == list(range(1, 11))
  assert per_process[0] == per_process[1]  # Both processes saw the same global losses.
  two_losses = _jsonl_losses(two)
  steps = sorted(one_losses)
  np.testing.assert_allclose([two_losses[s] for s in steps], [one_losses[s] for s in steps],
                             rtol=1e-6)

  # The 2-process checkpoint resumes in 1 process, and the 1-process one in 2 processes.
  # The lead of two processes derived the global batches the single process read.
  assert ledger.read(two) == ledger.read(one)
  _one_process(two, '--config.train.num_steps=14')
  one = _resume_copy(one, str(tmp_path / 'one'))
  _two_processes(one, '--config.train.num_steps=14')
  resumed_in_one, resumed_in_two = _jsonl_losses(two), _jsonl_losses(one)
  assert sorted(resumed_in_one) == sorted(resumed_in_two) == list(range(1, 15))
  np.testing.assert_allclose([resumed_in_one[s] for s in range(11, 15)],
                             [resumed_in_two[s] for s in range(11, 15)], rtol=1e-6)
  two_then_one, one_then_two = ledger.read(two), ledger.read(one)
  assert [r['step'] for r in two_then_one if 'digest' in r] == list(range(1, 15))
  assert two_then_one == one_then_two


def test_pmap_across_processes_matches_jit_and_checkpoints_cross_modes(tmp_path,
                                                                       one_process_run):
  pmap = str(tmp_path / 'pmap')
  one, one_losses = one_process_run
  _two_processes(pmap, '--config.parallelism=pmap')
  logs = [open(os.path.join(pmap, 'logs', f'process_{i}.log'), encoding='utf-8').read()
          for i in range(2)]
  per_process = [_logged_losses(text) for text in logs]
  assert sorted(per_process[0]) == list(range(1, 11))
  # Gradients averaged over all 8 devices: both processes train the same model.
  assert per_process[0] == per_process[1]
  pmap_losses = _jsonl_losses(pmap)
  steps = sorted(one_losses)
  np.testing.assert_allclose([pmap_losses[s] for s in steps], [one_losses[s] for s in steps],
                             rtol=1e-5)
  eval_records = [r for r in _jsonl_records(pmap) if 'eval/accuracy' in r]
  one_eval = [r for r in _jsonl_records(one) if 'eval/accuracy' in r]
  assert [r['step'] for r in eval_records] == [r['step'] for r in one_eval] == [10]
  np.testing.assert_allclose(eval_records[0]['eval/loss'], one_eval[0]['eval/loss'], rtol=1e-5)

  # pmap x 2 processes -> jit x 1 process, and jit x 1 process -> pmap x 2 processes.
  _one_process(pmap, '--config.train.num_steps=14')
  jit_copy = _resume_copy(one, str(tmp_path / 'jit_then_pmap'))
  _two_processes(jit_copy, '--config.train.num_steps=14', '--config.parallelism=pmap')
  into_jit, into_pmap = _jsonl_losses(pmap), _jsonl_losses(jit_copy)
  assert sorted(into_jit) == sorted(into_pmap) == list(range(1, 15))
  np.testing.assert_allclose([into_jit[s] for s in range(11, 15)],
                             [into_pmap[s] for s in range(11, 15)], rtol=1e-5)


def test_killing_a_peer_ends_the_survivor_naming_it(tmp_path):
  workdir = str(tmp_path)
  port = 20000 + os.getpid() % 20000
  procs = []
  for pid in range(2):
    cmd = [sys.executable, '-m', 'pipeline.main', f'--config={CONFIG}', f'--workdir={workdir}',
           f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
           f'--process_id={pid}', '--heartbeat_timeout_s=20', *FLAGS,
           '--config.train.num_steps=100000', '--config.checkpoint.every_steps=100000',
           '--config.train.eval_every_steps=100000']
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=_env(4), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True))
  metrics = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + 240
  while time.time() < deadline and not (os.path.exists(metrics) and
                                        os.path.getsize(metrics) > 2000):
    assert procs[0].poll() is None and procs[1].poll() is None
    time.sleep(0.2)
  procs[1].send_signal(signal.SIGKILL)
  killed_at = time.time()
  _, err = procs[0].communicate(timeout=150)
  took = time.time() - killed_at
  assert procs[0].returncode != 0
  assert took < 120, took
  # JAX's coordination service names the task that stopped sending heartbeats.
  assert re.search(r'tasks are unhealthy \(stopped sending heartbeats\):\s*1\b|'
                   r'process\(es\) 1', err), err[-3000:]
