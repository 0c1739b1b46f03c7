"""launch/slurm.sbatch on a real SLURM 22.05 cluster (launch/slurm_cluster.sh).

A session fixture brings up the private single-node cluster (installing the Debian
packages on first use) and fails the tests with the script's output if it cannot.
Every job is 2 tasks x 4 fake CPU devices training the Fashion-MNIST smoke variant:
it must log the losses of a plain 1-process run on 8 devices, and a job told to stop
mid-run (the batch shell's time-limit signal) must save, requeue itself, resume and
end with the parameters of the uninterrupted job, bit for bit.
"""

import os
import pathlib
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from tests import workdirs

REPO = pathlib.Path(__file__).resolve().parents[1]
CLUSTER = REPO / 'launch' / 'slurm_cluster.sh'
CONFIG = 'configs/fashion_mnist_cnn.py:smoke'
NUM_STEPS = 40
JOB_NAME = 'jax-pipeline-test-'  # Prefix of the jobs these tests submit.
ENDED = ('COMPLETED', 'FAILED', 'CANCELLED', 'TIMEOUT', 'NODE_FAIL', 'OUT_OF_MEMORY',
         'BOOT_FAIL', 'DEADLINE', 'PREEMPTED')


@pytest.fixture(scope='session')
def slurm_env():
  """The environment for SLURM clients and jobs; the cluster runs until the end."""
  was_up = subprocess.run(['bash', str(CLUSTER), 'status'], capture_output=True,
                          timeout=60).returncode == 0
  start = subprocess.run(['bash', str(CLUSTER), 'start'], capture_output=True, text=True,
                         timeout=900)
  conf = re.search(r'^export SLURM_CONF=(\S+)$', start.stdout, re.M)
  if start.returncode != 0 or conf is None:
    pytest.fail(f'launch/slurm_cluster.sh start failed (status {start.returncode}):\n'
                f'{start.stdout}\n{start.stderr}', pytrace=False)
  # A job inherits this environment: no SLURM_* of an outer job, and no device count from
  # the test process (conftest.py), which the job sets per task.
  env = {k: v for k, v in os.environ.items()
         if not k.startswith('SLURM_') and k not in ('XLA_FLAGS', 'JAX_PLATFORMS')}
  env.update(SLURM_CONF=conf.group(1), PYTHON=sys.executable, TF_CPP_MIN_LOG_LEVEL='3')
  yield env
  if not was_up:  # A cluster someone started by hand stays up.
    stop = subprocess.run(['bash', str(CLUSTER), 'stop'], capture_output=True, text=True,
                          timeout=300)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    status = subprocess.run(['bash', str(CLUSTER), 'status'], capture_output=True, text=True,
                            timeout=60)
    assert status.returncode == 3 and status.stdout.count('not running') == 3, status.stdout


def test_cluster_start_again_is_a_check_and_status_lists_the_daemons(slurm_env):
  again = subprocess.run(['bash', str(CLUSTER), 'start'], capture_output=True, text=True,
                         timeout=60)
  assert again.returncode == 0, again.stdout + again.stderr
  assert f'export SLURM_CONF={slurm_env["SLURM_CONF"]}' in again.stdout
  status = subprocess.run(['bash', str(CLUSTER), 'status'], capture_output=True, text=True,
                          timeout=60)
  assert status.returncode == 0, status.stdout + status.stderr
  for daemon in ('munged', 'slurmctld', 'slurmd'):
    assert re.search(rf'^{daemon}: running \(pid \d+\)$', status.stdout, re.M), status.stdout
  # The one node is usable: it matches what `slurmd -C` found (else SLURM drains it).
  node = subprocess.run(['sinfo', '-h', '-n', 'localhost', '-o', '%T %c'], env=slurm_env,
                        capture_output=True, text=True, timeout=30).stdout.split()
  assert node[0] in ('idle', 'mixed', 'allocated', 'completing') and int(node[1]) >= 2, node


def flags_for(num_steps):
  """pipeline.main flags: one loss log a step; saves only where the run stops and at the
  end, so that a save mid-run can only be the stop."""
  return ['--config.train.log_every_steps=1', f'--config.train.eval_every_steps={num_steps}',
          f'--config.checkpoint.every_steps={num_steps}', f'--config.train.num_steps={num_steps}',
          '--config.optimizer.warmup_steps=3', '--config.eval.batch_size=1000']


FLAGS = flags_for(NUM_STEPS)


def submit(env, tmp_path, *sbatch_args, flags=FLAGS):
  """Submits a CPU-only 2 x 4-device job; returns (job id, workdir, log path)."""
  workdir, log = tmp_path / 'workdir', tmp_path / 'job.out'
  result = subprocess.run(
      ['bash', 'launch/slurm.sbatch', '--gpus-per-node', '0', '--tasks', '2',
       '--cpu-devices', '4', '--job-name', f'{JOB_NAME}{tmp_path.name}', '--output', str(log),
       *sbatch_args, '--config', CONFIG, '--workdir', str(workdir), '--', *flags],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
  submitted = re.search(r'Submitted batch job (\d+)', result.stdout)
  assert result.returncode == 0 and submitted, result.stdout + result.stderr
  return submitted.group(1), workdir, log


def job_fields(env, job_id):
  """JobState, Restarts and the other fields of `scontrol show job`."""
  out = subprocess.run(['scontrol', 'show', 'job', '-o', job_id], env=env,
                       capture_output=True, text=True, timeout=30).stdout
  return dict(re.findall(r'(\w+)=(\S*)', out))


def read(path):
  return path.read_text(errors='replace') if path.exists() else ''


def wait_until_ended(env, job_id, log, timeout_s=400, on_poll=None):
  """Polls the job until it has ended; returns its fields. Fails on the timeout."""
  deadline = time.time() + timeout_s
  while time.time() < deadline:
    if on_poll:
      on_poll()
    fields = job_fields(env, job_id)
    if fields.get('JobState') in ENDED:
      return fields
    time.sleep(0.1)
  subprocess.run(['scancel', job_id], env=env, timeout=30, check=False)
  pytest.fail(f'job {job_id} still {job_fields(env, job_id).get("JobState")} after '
              f'{timeout_s} s; log tail:\n{read(log)[-3000:]}')


@pytest.fixture(autouse=True)
def cancel_leftover_jobs(slurm_env):
  """A test that fails mid-job must not leave the job holding the cluster's only node."""
  yield
  queue = subprocess.run(['squeue', '-h', '-o', '%i %j'], env=slurm_env, capture_output=True,
                         text=True, timeout=30).stdout.split()
  ours = [job_id for job_id, name in zip(queue[::2], queue[1::2]) if name.startswith(JOB_NAME)]
  if ours:
    subprocess.run(['scancel', *ours], env=slurm_env, timeout=30, check=False)


def task_losses(log_text):
  """task -> {step: train/loss} as each task's CLU LoggingWriter printed it (%.6g)."""
  losses = {}
  for task, step, loss in re.findall(r'^(\d+): .*?\] \[(\d+)\] .*?train/loss=([0-9.e+-]+)',
                                     log_text, re.M):
    losses.setdefault(int(task), {})[int(step)] = float(loss)
  return losses


@pytest.fixture(scope='module')
def uninterrupted(slurm_env, tmp_path_factory):
  """A 2-task job that trains NUM_STEPS steps without interruption."""
  tmp_path = tmp_path_factory.mktemp('uninterrupted')
  job_id, workdir, log = submit(slurm_env, tmp_path)
  started = time.time()
  fields = wait_until_ended(slurm_env, job_id, log)
  text = read(log)
  print(f'uninterrupted 2-task job: {time.time() - started:.1f} s from submission to end')
  assert fields['JobState'] == 'COMPLETED' and fields['Restarts'] == '0', text[-3000:]
  return workdir, text


def test_two_tasks_log_the_losses_of_one_process(uninterrupted, tmp_path):
  workdir, text = uninterrupted
  assert '0: ' in text and 'process 1/2, local devices 4, global devices 8 (cpu)' in text
  one = tmp_path / 'one'
  env = {k: v for k, v in os.environ.items() if not k.startswith('SLURM_')}
  env.update(JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=8',
             TF_CPP_MIN_LOG_LEVEL='3')
  proc = subprocess.run([sys.executable, '-m', 'pipeline.main', f'--config={CONFIG}',
                         f'--workdir={one}', *FLAGS], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=400)
  assert proc.returncode == 0, proc.stderr[-3000:]
  reference = workdirs.losses(one)
  steps = list(range(1, NUM_STEPS + 1))
  assert sorted(reference) == steps
  # The job's lead writes metrics.jsonl at full precision.
  job = workdirs.losses(workdir)
  np.testing.assert_allclose([job[s] for s in steps], [reference[s] for s in steps], rtol=1e-6)
  # Each task's log prints 6 significant digits: 1e-6 relative beyond that rounding.
  per_task = task_losses(text)
  assert sorted(per_task) == [0, 1]
  for task, logged in per_task.items():
    assert sorted(logged) == steps, f'task {task} logged steps {sorted(logged)}'
    for s in steps:
      rounding = 0.5 * 10.0 ** (np.floor(np.log10(abs(reference[s]))) - 5)
      assert abs(logged[s] - reference[s]) <= rounding + 1e-6 * abs(reference[s]), (
          f'task {task} step {s}: logged {logged[s]}, 1 process {reference[s]}')


class Timeline:
  """Seconds from its creation to the first poll that saw each event in the job's log."""

  def __init__(self, log, events):
    self.log, self.events, self.seen = log, events, {}
    self.t0 = time.time()

  def poll(self):
    text = read(self.log)
    for name, found in self.events.items():
      if name not in self.seen and found(text):
        self.seen[name] = time.time() - self.t0

  def __str__(self):
    return ', '.join(f'{name} {t:.1f}' for name, t in self.seen.items())


def wait_for_step(env, job_id, workdir, log, step):
  """Returns once the job's lead has logged `step`."""
  deadline = time.time() + 300
  while max(workdirs.losses(workdir), default=0) < step:
    assert time.time() < deadline, read(log)[-3000:]
    assert job_fields(env, job_id).get('JobState') in ('PENDING', 'RUNNING'), read(log)[-3000:]
    time.sleep(0.1)


def stop_events(workdir):
  """What a stop, requeue and resume write to the job's log (and the step saved)."""
  stopped = {}

  def saved(text):
    steps = re.findall(r'Stop requested \(.*?\) at step (\d+)', text)
    if steps:
      stopped['step'] = int(steps[0])
    return bool(steps) and (workdir / 'checkpoints' / steps[0]).is_dir()

  def resumed(text):  # The lead logged the step after the stop, in the restarted job.
    return 'step' in stopped and re.search(
        rf'^0: .*?\] \[{stopped["step"] + 1}\] .*?train/loss=', text, re.M) is not None

  return {
      'batch shell asks the tasks to save': lambda t: 'asking the tasks to save' in t,
      'tasks log the stop': lambda t: 'Stop requested' in t,
      'stop step committed': saved,
      'job requeued': lambda t: 'requeueing job' in t,
      'job restarted': lambda t: '(restart 1)' in t,
      'first step after resume': resumed,
  }


def assert_stopped_once_and_resumed(fields, text, timeline, num_steps, signal_after):
  """Returns the step both tasks stopped at, saved, and resumed from."""
  assert fields['JobState'] == 'COMPLETED', text[-3000:]
  assert fields['Restarts'] == '1', text[-3000:]
  assert set(timeline.seen) == set(timeline.events), (str(timeline), text[-3000:])
  stops = re.findall(r'^(\d+): .*?Stop requested \((.*?)\) at step (\d+)', text, re.M)
  assert sorted(task for task, _, _ in stops) == ['0', '1'], stops
  steps = {int(step) for _, _, step in stops}
  assert len(steps) == 1, stops  # JAX's preemption sync: the same step on every task.
  step = steps.pop()
  assert signal_after <= step < num_steps, stops
  assert text.count(f'Training {num_steps} steps from step {step} ') == 2, text[-3000:]
  return step


def test_usr1_saves_requeues_and_resumes_bit_identically(slurm_env, uninterrupted, tmp_path):
  reference_dir, _ = uninterrupted
  job_id, workdir, log = submit(slurm_env, tmp_path)
  signal_after = 8
  wait_for_step(slurm_env, job_id, workdir, log, signal_after)
  # What SLURM sends the batch shell before the time limit (--signal=B:USR1@...).
  subprocess.run(['scancel', '--batch', '--signal=USR1', job_id], env=slurm_env, check=True,
                 timeout=30)
  timeline = Timeline(log, stop_events(workdir))
  fields = wait_until_ended(slurm_env, job_id, log, on_poll=timeline.poll)
  timeline.poll()
  print(f'USR1 job, seconds after scancel --batch --signal=USR1: {timeline}')
  assert_stopped_once_and_resumed(fields, read(log), timeline, NUM_STEPS, signal_after)
  step, state = workdirs.final_state(workdir)
  reference_step, reference_state = workdirs.final_state(reference_dir)
  assert step == reference_step == NUM_STEPS
  workdirs.assert_same_arrays(state, reference_state)  # Bit-identical parameters and statistics.
  assert workdirs.losses(workdir) == workdirs.losses(reference_dir)
