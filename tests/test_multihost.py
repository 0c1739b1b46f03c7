"""Tests for pipeline/multihost.py with real processes on this machine.

Each multi-process test starts two Python processes with 4 fake CPU devices each that
meet through a coordinator on 127.0.0.1, as `launch/local.sh` does.
"""

import os
import pathlib
import re
import signal
import subprocess
import sys
import time

from absl.testing import flagsaver
import portpicker
import pytest

from pipeline import multihost

REPO = pathlib.Path(__file__).resolve().parents[1]

# The per-process script. Actions: psum (agree on a cross-process sum), late (process 1
# never reaches the barrier), crash (process 1 raises while process 0 waits in a
# barrier), wait (all but --sleeper wait in a barrier; the test kills the sleeper).
WORKER = r'''
import sys, time
from absl import flags
from pipeline import multihost
flags.DEFINE_string('action', 'psum', '')
flags.DEFINE_integer('sleeper', 1, 'wait: the process that sleeps instead of arriving.')
flags.FLAGS(sys.argv)
multihost.initialize()
multihost.initialize()  # Must be a no-op.
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
mesh = Mesh(np.array(jax.devices()), ('data',))
print(multihost.topology_line(mesh), flush=True)
print('CPU COLLECTIVES', jax.config.jax_cpu_collectives_implementation, flush=True)
pid = jax.process_index()
action = flags.FLAGS.action
if action == 'psum':
  local = np.arange(jax.local_device_count(), dtype=np.float32) + 100 * pid
  x = jax.make_array_from_process_local_data(NamedSharding(mesh, P('data')), local)
  total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
  print('SUM', float(total), flush=True)
  multihost.barrier('done', 30)
  multihost.barrier('done', 30)  # A reused name is a new round.
  print('LEAD', multihost.is_lead(), flush=True)
  for round_ in range(2):  # The lead sees every offer; all get its decision.
    decided = multihost.lead_decides('pick', f'{pid}:{round_}', lambda o: '+'.join(o), 30)
    print('DECIDED', decided, flush=True)
elif action == 'late':
  if pid == 1:
    time.sleep(6)  # Past both 1.5 s timeouts of process 0.
  else:
    start = time.time()
    try:
      multihost.barrier('late', 1.5)
    except RuntimeError as e:
      print(f'ERROR after {time.time() - start:.1f}s: {e}', flush=True)
    try:
      multihost.lead_decides('late_offer', 'ok', lambda o: o[0], 1.5)
    except RuntimeError as e:
      print(f'UNDECIDED: {e}', flush=True)
elif action == 'crash':
  print('READY', flush=True)
  if pid == 1:
    raise ValueError('boom in process 1')
  multihost.barrier('crash', 200)
elif action == 'wait':
  print('READY', flush=True)
  if pid == flags.FLAGS.sleeper:
    time.sleep(200)
  else:
    multihost.barrier('wait', 200)
print('EXIT', flush=True)
'''


def _start(tmp_path, action, num_processes=2, extra=()):
  """Starts the worker processes; returns (processes, log paths)."""
  script = tmp_path / 'worker.py'
  script.write_text(WORKER)
  env = {k: v for k, v in os.environ.items() if not k.startswith('SLURM_')}
  env.update(JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO),
             XLA_FLAGS='--xla_force_host_platform_device_count=4')
  port = portpicker.pick_unused_port()
  procs, logs = [], []
  for i in range(num_processes):
    args = [sys.executable, str(script), f'--action={action}', *extra]
    if num_processes > 1:
      args += [f'--coordinator_address=127.0.0.1:{port}',
               f'--num_processes={num_processes}', f'--process_id={i}']
    log = tmp_path / f'{action}.{i}.log'
    with open(log, 'w') as f:
      procs.append(subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, env=env,
                                    cwd=REPO))
    logs.append(log)
  return procs, logs


def _wait_all(procs, timeout):
  try:
    return [p.wait(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def test_two_processes_agree_on_a_cross_process_sum(tmp_path):
  procs, logs = _start(tmp_path, 'psum')
  assert _wait_all(procs, 60) == [0, 0], [log.read_text()[-2000:] for log in logs]
  texts = [log.read_text() for log in logs]
  # Process 0 holds 0..3, process 1 holds 100..103.
  expected = sum(range(4)) + sum(range(100, 104))
  for i, text in enumerate(texts):
    assert (f"process {i}/2, local devices 4, global devices 8 (cpu), mesh {{data: 8}}"
            in text), text
    assert f'SUM {float(expected)}' in text, text
    assert f'LEAD {i == 0}' in text, text
    assert 'DECIDED 0:0+1:0\nDECIDED 0:1+1:1\n' in text, text
    assert 'CPU COLLECTIVES gloo' in text, text  # Across processes: over TCP.


def test_one_process_without_flags_initializes_a_local_runtime(tmp_path):
  procs, logs = _start(tmp_path, 'psum', num_processes=1)
  assert _wait_all(procs, 60) == [0], logs[0].read_text()[-2000:]
  text = logs[0].read_text()
  assert 'process 0/1, local devices 4, global devices 4 (cpu), mesh {data: 4}' in text
  assert 'SUM 6.0' in text and 'LEAD True' in text
  # One process keeps XLA's in-process collectives: gloo's TCP ones made the default CNN
  # on 8 fake devices train at 580 examples/s instead of 1,870.
  assert 'CPU COLLECTIVES None' in text, text


def test_barrier_timeout_names_the_process_that_did_not_arrive(tmp_path):
  procs, logs = _start(tmp_path, 'late')
  assert _wait_all(procs, 60) == [0, 0], [log.read_text()[-2000:] for log in logs]
  text = logs[0].read_text()
  match = re.search(r'ERROR after ([\d.]+)s: (.*)', text)
  assert match, text
  assert float(match.group(1)) < 10
  assert match.group(2).startswith(
      "barrier 'late' timed out after 1.5 s on process 0: process(es) 1 had not arrived.")
  assert ("UNDECIDED: 'late_offer' was not decided within 1.5 s on process 0: "
          'process(es) 1 made no offer.') in text, text


@pytest.mark.parametrize('victim', [1, 0], ids=['worker_dies', 'coordinator_dies'])
def test_survivor_exits_when_a_peer_is_killed(tmp_path, victim):
  heartbeat_s = 5  # Short to keep the test quick; the default is 60 s.
  procs, logs = _start(tmp_path, 'wait', extra=[f'--heartbeat_timeout_s={heartbeat_s}',
                                                f'--sleeper={victim}'])
  survivor = 1 - victim
  deadline = time.time() + 60
  while not all('READY' in log.read_text() for log in logs):
    assert time.time() < deadline and all(p.poll() is None for p in procs), (
        [log.read_text()[-2000:] for log in logs])
    time.sleep(0.2)
  time.sleep(0.5)  # Let the survivor enter the barrier.
  procs[victim].send_signal(signal.SIGKILL)
  killed_at = time.time()
  rc = _wait_all([procs[survivor]], 120)[0]
  elapsed = time.time() - killed_at
  _wait_all(procs, 5)
  text = logs[survivor].read_text()
  print(f'survivor {survivor} exited rc={rc} {elapsed:.1f}s after process {victim} died')
  assert rc != 0, text[-3000:]
  assert elapsed < 120
  assert 'EXIT' not in text
  if victim == 1:
    assert _names_dead_process_1(text), text[-3000:]
  else:
    assert 'leader task was preempted/died' in text, text[-3000:]


def test_a_crash_exits_at_once_and_the_survivor_follows_within_the_heartbeat(tmp_path):
  heartbeat_s = 5
  procs, logs = _start(tmp_path, 'crash', extra=[f'--heartbeat_timeout_s={heartbeat_s}'])
  start = time.time()
  # Without the fast exit, the crashed process would sit in JAX's shutdown barrier for
  # 300 s and the survivor with it.
  assert _wait_all([procs[1]], 30) == [1], logs[1].read_text()[-3000:]
  assert 'ValueError: boom in process 1' in logs[1].read_text()
  rc = _wait_all([procs[0]], 60)[0]
  text = logs[0].read_text()
  print(f'survivor exited rc={rc} {time.time() - start:.1f}s after the start')
  assert rc != 0 and 'EXIT' not in text, text[-3000:]
  assert _names_dead_process_1(text), text[-3000:]


def _names_dead_process_1(text):
  """Whether the survivor's output names process 1 as the one that died.

  Two races end the survivor: the coordination service aborts it (JAX's message), or
  the barrier fails first and raises (ours).
  """
  return bool(re.search(r'stopped sending heartbeats\):\s*1\s', text) or
              re.search(r"barrier '\w+' failed on process 0: process\(es\) 1 had not "
                        r'arrived\. Runtime said: .*Task 1 heartbeat timeout', text))


def test_partial_flags_outside_a_cluster_fail_naming_the_missing_flags(monkeypatch):
  monkeypatch.setattr(multihost, 'detected_cluster', lambda: None)
  with flagsaver.flagsaver(num_processes=2, process_id=1):
    with pytest.raises(ValueError, match='missing: --coordinator_address'):
      multihost.initialize()


def test_slurm_environment_is_detected(monkeypatch):
  for name, value in [('SLURM_JOB_ID', '123'), ('SLURM_STEP_NODELIST', 'node[01-02]'),
                      ('SLURM_NTASKS', '16'), ('SLURM_PROCID', '3'), ('SLURM_LOCALID', '3')]:
    monkeypatch.setenv(name, value)
  assert multihost.detected_cluster() == 'SlurmCluster'
  monkeypatch.delenv('SLURM_JOB_ID')
  assert multihost.detected_cluster() != 'SlurmCluster'


def test_barrier_is_a_no_op_without_a_multi_process_runtime():
  multihost.barrier('anything', timeout_s=0.01)


def test_expected_gpu_on_a_cpu_only_jax_stops_before_training(tmp_path):
  """What a GPU job from launch/slurm.sbatch does when its jax has only the CPU build."""
  env = {k: v for k, v in os.environ.items() if not k.startswith('SLURM_')}
  env.update(JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  workdir = tmp_path / 'run'
  start = time.time()
  proc = subprocess.run([sys.executable, '-m', 'pipeline.main',
                         '--config=configs/fashion_mnist_cnn.py:smoke', f'--workdir={workdir}',
                         '--expect_platform=gpu'], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=120)
  took = time.time() - start
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert ('RuntimeError: expected gpu devices (--expect_platform=gpu; launch/slurm.sbatch '
          'passes it when --gpus-per-node > 0) but JAX found only cpu: 8 local cpu device(s)'
          in proc.stderr), proc.stderr[-3000:]
  assert f"pip install -c requirements.lock 'jax[cuda12]=={multihost.jax.__version__}'" in (
      proc.stderr)
  assert not workdir.exists()  # Stopped before the loop wrote anything.
  assert took < 60, took  # Before any compilation (about 2 s here).


@pytest.mark.parametrize('expected, fails', [('', False), ('cpu', False), ('tpu', True)])
def test_check_platform_passes_the_platform_jax_runs_on(expected, fails):
  with flagsaver.flagsaver(expect_platform=expected):
    if fails:
      with pytest.raises(RuntimeError, match=r"expected tpu devices .* found only cpu: .*"
                         r"'jax\[tpu\]==.*launch/tpu_vm.sh does so on every worker"):
        multihost.check_platform()
    else:
      multihost.check_platform()
