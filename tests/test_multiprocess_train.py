"""Real multi-process training on one machine: 4 processes x 2 or 2 x 4 fake CPU devices
(gloo), launched with launch/local.sh, the same code path as a pod.

The references are module fixtures: 1 process x 8 devices and 4 x 2, 10 steps each;
tests that resume one copy it first.
"""

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
import tensorstore as ts

from pipeline import ledger
from tests import workdirs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A constant learning rate: a run's first steps do not depend on its length, so a longer
# run (the four-process ones, long enough for a stop to land before their end) compares
# step for step with a 10-step one.
FLAGS = ['--config.train.log_every_steps=1', '--config.train.eval_every_steps=10',
         '--config.checkpoint.every_steps=5', '--config.train.num_steps=10',
         '--config.optimizer.schedule=constant', '--config.eval.batch_size=1000']
FOUR = ['--config.mesh.dcn_data=4', '--config.train.num_steps=40']
FOUR_STEPS = 40
CONFIG = 'configs/fashion_mnist_cnn.py:smoke'


def _env(devices):
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3', PYTHON=sys.executable)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  return env


def _local_sh(workdir, num_processes, *extra):
  return ['bash', 'launch/local.sh', '--config', CONFIG, '--workdir', workdir,
          '--num_processes', str(num_processes),
          '--devices_per_process', str(8 // num_processes), '--', *FLAGS, *extra]


def _processes(workdir, num_processes, *extra):
  proc = subprocess.run(_local_sh(workdir, num_processes, *extra), cwd=ROOT,
                        env=_env(8 // num_processes), capture_output=True, text=True,
                        timeout=400)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def _two_processes(workdir, *extra):
  _processes(workdir, 2, *extra)


def _logs(workdir, num_processes):
  return [open(os.path.join(workdir, 'logs', f'process_{i}.log'), encoding='utf-8').read()
          for i in range(num_processes)]


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


@pytest.fixture(scope='module')
def four_process_run(tmp_path_factory):
  """4 processes x 2 devices, 40 steps; dcn_data=4: the data axis laid over the
  processes (the hybrid mesh path)."""
  workdir = str(tmp_path_factory.mktemp('four_processes') / 'run')
  _processes(workdir, 4, *FOUR)
  return workdir, _jsonl_losses(workdir)


def _resume_copy(source, destination):
  shutil.copytree(source, destination)
  return destination


def test_four_processes_match_one(one_process_run, four_process_run):
  one, one_losses = one_process_run
  four, four_losses = four_process_run
  logs = _logs(four, 4)
  assert 'process 3/4, local devices 2, global devices 8' in logs[3]
  per_process = [_logged_losses(text) for text in logs]
  assert sorted(per_process[0]) == list(range(1, FOUR_STEPS + 1))
  assert all(p == per_process[0] for p in per_process)  # All saw the same global losses.
  steps = sorted(one_losses)
  assert steps == list(range(1, 11))
  np.testing.assert_allclose([four_losses[s] for s in steps], [one_losses[s] for s in steps],
                             rtol=1e-6)
  # The lead of four processes derived the global batches the single process read.
  assert ledger.read(four)[:len(ledger.read(one))] == ledger.read(one)


def test_a_stop_sent_to_all_four_saves_one_step_and_resumes_bit_identically(
    tmp_path, four_process_run):
  reference, reference_losses = four_process_run
  workdir = str(tmp_path / 'stopped')
  command = _local_sh(workdir, 4, *FOUR)
  with open(tmp_path / 'local.log', 'w', encoding='utf-8') as out:
    proc = subprocess.Popen(command, cwd=ROOT, env=_env(2), stdout=out,
                            stderr=subprocess.STDOUT)
    metrics = os.path.join(workdir, 'metrics.jsonl')
    deadline = time.time() + 300
    while not (os.path.exists(metrics) and 2 in _jsonl_losses(workdir)):
      assert proc.poll() is None and time.time() < deadline, 'no step 2'
      time.sleep(0.05)
    # local.sh's children: `env` execs Python, so these are the four pipeline processes.
    pids = [int(p) for p in subprocess.run(['pgrep', '-P', str(proc.pid)],
                                           capture_output=True, text=True).stdout.split()]
    assert len(pids) == 4, pids
    for pid in pids:  # As a scheduler signals every task of a preempted job.
      os.kill(pid, signal.SIGTERM)
    signalled = time.time()
    assert proc.wait(timeout=120) == 0
  took = time.time() - signalled
  stops = [re.findall(r'Stop requested \(.*?\) at step (\d+): checkpoint saved', log)
           for log in _logs(workdir, 4)]
  print(f'SIGTERM to 4 processes: all stopped at step {stops[0]}, exited {took:.1f} s '
        'after the signal')
  assert all(s == stops[0] for s in stops) and len(stops[0]) == 1, stops
  stop_step = int(stops[0][0])
  assert 2 <= stop_step < FOUR_STEPS, stop_step
  saved = workdirs.committed_steps(workdir)
  assert max(saved) == stop_step, saved  # The stop's step, after the periodic saves.

  # Resumed on 2 processes x 4 devices: the same examples (the ledger of the
  # uninterrupted run), the same losses up to the reduction order (held to 1e-6 for the
  # first 5 steps after the stop: rounding differences grow over a run).
  two = _resume_copy(workdir, str(tmp_path / 'then_two'))
  _processes(two, 2, '--config.train.num_steps=40')
  assert ledger.read(two) == ledger.read(reference)
  then_two = _jsonl_losses(two)
  assert sorted(then_two) == list(range(1, FOUR_STEPS + 1))
  compared = range(1, stop_step + 6)
  np.testing.assert_allclose([then_two[s] for s in compared],
                             [reference_losses[s] for s in compared], rtol=1e-6)

  _processes(workdir, 4, *FOUR)
  assert _jsonl_losses(workdir) == reference_losses
  assert ledger.read(workdir) == ledger.read(reference)
  step, state = workdirs.final_state(workdir)
  ref_step, ref_state = workdirs.final_state(reference)
  assert step == ref_step == FOUR_STEPS
  workdirs.assert_same_arrays(state, ref_state)


def test_pmap_across_processes_matches_jit_and_checkpoints_cross_modes(tmp_path,
                                                                       one_process_run):
  pmap = str(tmp_path / 'pmap')
  one, one_losses = one_process_run
  _two_processes(pmap, '--config.parallelism=pmap')
  per_process = [_logged_losses(text) for text in _logs(pmap, 2)]
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
  # The 4 resumed steps in one call: 4 CPU devices per process dispatch its steps one by
  # one (train.Trainer), the index a mapped argument of each process like the batch.
  _two_processes(jit_copy, '--config.train.num_steps=14', '--config.parallelism=pmap',
                 '--config.train.steps_per_call=4')
  into_jit, into_pmap = _jsonl_losses(pmap), _jsonl_losses(jit_copy)
  assert sorted(into_jit) == sorted(into_pmap) == list(range(1, 15))
  np.testing.assert_allclose([into_jit[s] for s in range(11, 15)],
                             [into_pmap[s] for s in range(11, 15)], rtol=1e-5)
  # 2 -> 1 and 1 -> 2 processes consumed the same examples.
  assert ledger.read(pmap) == ledger.read(jit_copy)


def test_a_step_only_one_process_cannot_read_is_skipped_by_both(tmp_path):
  """Under FSDP each process reads only its own shards: damage to process 1's files of
  step 10 is seen by process 1 alone. Both must restore step 5 (the lead decides), not
  one step each, and not wait for each other forever."""
  workdir = str(tmp_path / 'run')
  fsdp = ['--config.fsdp=True', '--config.mesh.fsdp=8', '--config.mesh.data=1']
  _two_processes(workdir, *fsdp)
  first = _jsonl_losses(workdir)
  damaged = _damage_own_shards(os.path.join(workdir, 'checkpoints', '10', 'state'), 1)
  assert len(damaged) == 12, damaged  # Shards 4-7 of the dense kernel, its mu and its nu.

  started = time.time()
  _two_processes(workdir, *fsdp)  # Steps 6-10 again, from step 5.
  took = time.time() - started
  print(f'2 processes, step 10 unreadable on process 1 only: rerun took {took:.1f} s')
  for i in range(2):
    with open(os.path.join(workdir, 'logs', f'process_{i}.log'), encoding='utf-8') as f:
      log = f.read()
    assert re.search(r'Checkpoint step 10 in \S+ is unreadable on process 1: ', log), log[-3000:]
    assert 'Restored checkpoint step 5 from' in log, log[-3000:]
  resumed = _jsonl_losses(workdir)
  assert sorted(resumed) == list(range(1, 11))
  assert [resumed[s] for s in range(6, 11)] == [first[s] for s in range(6, 11)]
  names = os.listdir(os.path.join(workdir, 'checkpoints'))
  assert any(n.startswith('10.unreadable-') for n in names), names


def _damage_own_shards(state_dir, process):
  """Breaks the zstd frame of each chunk of a sharded array that `process` wrote, the
  chunks it alone reads back; returns their keys.

  Only the arrays sharded over the mesh (the dense kernel and its Adam moments, the ones of
  >= fsdp_min_size elements) qualify: Orbax writes a replicated array in slices spread over
  all processes' files, and every process reads all of them. Damage is aimed through
  OCDBT's own index of where each value lies, and the frame's magic number is zeroed so
  the read must fail. Zeroing bytes in the middle of each file did not: a CI run restored
  them without an error (zeros in a zstd literal run decode as other numbers), and where
  they hit a replicated array's slice, both processes failed.
  """
  store = ts.KvStore.open(f'file://{state_dir}/').result()
  version = ts.ocdbt.dump(store).result()['versions'][-1]
  assert version['root_height'] == 0, version  # One B-tree node lists every value.
  node = ts.ocdbt.dump(store, version['root']['location']).result()
  prefix = f'value:ocdbt.process_{process}/:'
  damaged = []
  for entry in node['entries']:
    value = entry.get('indirect_value', '')
    if not (value.startswith(prefix) and b'Dense_0.kernel/' in entry['key']):
      continue
    file, offset, _ = value[len(prefix):].rsplit(':', 2)
    with open(os.path.join(state_dir, f'ocdbt.process_{process}', file), 'r+b') as f:
      f.seek(int(offset))
      assert f.read(4) == b'\x28\xb5\x2f\xfd', entry  # A zstd frame starts here.
      f.seek(int(offset))
      f.write(bytes(4))
    damaged.append(entry['key'].decode())
  return damaged


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
