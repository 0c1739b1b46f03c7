"""Tests for launch/: the commands each script would run, its argument errors, and
shellcheck. local.sh also runs for real against a stand-in pipeline.main; the SLURM
scripts run for real on a private cluster in tests/test_slurm.py.
"""

import os
import pathlib
import shutil
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / 'launch'
LAUNCHERS = ['local.sh', 'slurm.sbatch', 'slurm_run.sh', 'tpu_vm.sh']
SCRIPTS = [*LAUNCHERS, 'slurm_cluster.sh']


def _bash(script, *args, env=None, cwd=REPO, timeout=30):
  full_env = {k: v for k, v in os.environ.items() if not k.startswith('SLURM_')}
  full_env.update(env or {})
  return subprocess.run(['bash', str(LAUNCH / script), *args], capture_output=True,
                        text=True, env=full_env, cwd=cwd, timeout=timeout)


def _commands(result):
  """The '+ ' lines of a dry run, without the prefix."""
  assert result.returncode == 0, result.stderr
  return [line[2:] for line in result.stdout.splitlines() if line.startswith('+ ')]


@pytest.mark.parametrize('script', SCRIPTS)
def test_help_prints_usage(script):
  result = _bash(script, '--help')
  assert result.returncode == 0, result.stderr
  assert 'Usage' in result.stdout
  # Every launcher can show what it would run; the cluster script has nothing to preview.
  assert ('--dry-run' in result.stdout) == (script in LAUNCHERS)


@pytest.mark.parametrize('script', SCRIPTS)
def test_shellcheck_passes(script):
  if shutil.which('shellcheck') is None:
    pytest.fail('shellcheck is not installed (make setup installs it; or apt-get install '
                'shellcheck)')
  result = subprocess.run(['shellcheck', '--shell=bash', str(LAUNCH / script)],
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stdout


TPU_ARGS = ['--name', 'rn50', '--zone', 'us-central2-b', '--accelerator', 'v4-16',
            '--config', 'configs/imagenet_resnet50.py', '--workdir', 'gs://bucket/run']


def test_tpu_vm_dry_run_creates_installs_trains_streams_and_deletes():
  commands = _commands(_bash('tpu_vm.sh', *TPU_ARGS, '--spot', '--dry-run', '--',
                             '--config.num_epochs=2'))
  assert commands[0] == ('gcloud compute tpus tpu-vm create rn50 --accelerator-type=v4-16 '
                         '--version=tpu-ubuntu2204-base --zone=us-central2-b --spot')
  ssh = 'gcloud compute tpus tpu-vm ssh rn50 --zone=us-central2-b'
  assert any(c.startswith('gcloud compute tpus tpu-vm scp ') and '--worker=all' in c
             for c in commands)
  install = [c for c in commands if c.startswith(f'{ssh} --worker=all') and 'uv pip' in c]
  assert install and 'uv pip install -c requirements.lock -e .' in install[0]
  assert 'uv pip install -c requirements.lock "jax[tpu]==' in install[0]
  start = [c for c in commands if 'python -m pipeline.main' in c]
  assert len(start) == 1 and start[0].startswith(f'{ssh} --worker=all')
  # The same command on every worker, no coordinator flags: JAX detects the TPU VM.
  # --expect_platform: a worker without the TPU build of jax stops instead of using CPUs.
  assert ('python -m pipeline.main --config=configs/imagenet_resnet50.py '
          '--workdir=gs://bucket/run --mode=train --expect_platform=tpu '
          '--config.num_epochs=2') in start[0]
  assert 'coordinator' not in start[0]
  assert commands[-2].startswith(f'{ssh} --worker=0') and 'tail' in commands[-2]
  assert commands[-1] == 'gcloud compute tpus tpu-vm delete rn50 --zone=us-central2-b --quiet'


def test_tpu_vm_queued_and_keep():
  commands = _commands(_bash('tpu_vm.sh', *TPU_ARGS, '--queued', '--keep', '--project', 'p',
                             '--dry-run'))
  assert commands[0].startswith('gcloud compute tpus queued-resources create rn50 '
                                '--node-id=rn50 --accelerator-type=v4-16')
  assert '--project=p' in commands[0]
  assert commands[1].startswith('gcloud compute tpus queued-resources describe rn50')
  assert not any(' delete ' in c for c in commands)


@pytest.mark.parametrize('args, message', [
    (['--name', 'x', '--zone', 'z'], 'missing --accelerator --config --workdir'),
    (TPU_ARGS[:-1] + ['/local/dir'], '--workdir must be a gs:// path'),
    (TPU_ARGS + ['--bogus'], "unknown argument '--bogus'"),
])
def test_tpu_vm_bad_arguments_fail_with_a_message(args, message):
  result = _bash('tpu_vm.sh', *args, '--dry-run')
  assert result.returncode == 2 and message in result.stderr, result.stderr


SLURM_ARGS = ['--config', 'configs/imagenet_resnet50.py', '--workdir', '/shared/run']


def test_slurm_dry_run_two_nodes_of_eight_gpus():
  commands = _commands(_bash('slurm.sbatch', '--dry-run', '--nodes', '2', '--gpus-per-node',
                             '8', *SLURM_ARGS, '--', '--config.seed=1'))
  install, sbatch, srun, _ = commands
  # The CUDA build of the pinned jax, the version read from the lock file.
  jax_pin = next(line for line in (REPO / 'requirements.lock').read_text().splitlines()
                 if line.startswith('jax=='))
  assert install == (f'python3 -m pip install -q -c {REPO}/requirements.lock '
                     f"'jax[cuda12]=={jax_pin[5:]}'")
  assert sbatch.startswith('sbatch --nodes=2 --ntasks-per-node=8 --gres=gpu:8 '
                           '--time=24:00:00 --signal=B:USR1@120 ')
  # The job gets the same arguments, less --dry-run.
  assert sbatch.endswith('launch/slurm.sbatch --nodes 2 --gpus-per-node 8 --config '
                         'configs/imagenet_resnet50.py --workdir /shared/run -- '
                         '--config.seed=1')
  assert srun == ('srun --kill-on-bad-exit=1 --label env LAUNCH_TASKS=per-gpu '
                  'LAUNCH_GPUS_PER_NODE=8 bash launch/slurm_run.sh '
                  '--config=configs/imagenet_resnet50.py --workdir=/shared/run '
                  '--mode=train --expect_platform=gpu --config.seed=1 &')


def test_slurm_dry_run_cpu_only_with_fake_devices():
  commands = _commands(_bash('slurm.sbatch', '--dry-run', '--gpus-per-node', '0', '--tasks',
                             '2', '--cpu-devices', '4', '--time', '00:02:00',
                             '--signal-before', '90', '--output', '/tmp/o-%j.out',
                             '--no-jax-install', *SLURM_ARGS))
  sbatch, srun, _ = commands  # No jax install: CPU jobs use the pinned CPU jaxlib.
  # --gres=none overrides the file's default GPU request.
  assert sbatch.startswith('sbatch --nodes=1 --ntasks-per-node=2 --gres=none '
                           '--time=00:02:00 --signal=B:USR1@90 --output=/tmp/o-%j.out ')
  assert srun == ('srun --kill-on-bad-exit=1 --label env LAUNCH_TASKS=2 '
                  'LAUNCH_GPUS_PER_NODE=0 LAUNCH_CPU_DEVICES=4 bash launch/slurm_run.sh '
                  '--config=configs/imagenet_resnet50.py --workdir=/shared/run --mode=train &')
  task = _commands(_bash('slurm_run.sh', '--dry-run', '--config=c.py', '--workdir=/w',
                         env={'LAUNCH_TASKS': '2', 'LAUNCH_GPUS_PER_NODE': '0',
                              'LAUNCH_CPU_DEVICES': '4', 'XLA_FLAGS': '--xla_dump_to=/d'}))
  assert task == ['JAX_PLATFORMS=cpu XLA_FLAGS=--xla_dump_to=/d '
                  '--xla_force_host_platform_device_count=4 python3 -m pipeline.main '
                  '--config=c.py --workdir=/w']


def test_slurm_file_asks_for_requeue_and_an_early_signal():
  text = (LAUNCH / 'slurm.sbatch').read_text()
  assert '#SBATCH --requeue' in text and '#SBATCH --signal=B:USR1@120' in text


def test_slurm_one_task_per_node_drives_all_its_gpus():
  commands = _commands(_bash('slurm.sbatch', '--dry-run', '--nodes', '2', '--tasks',
                             'per-node', *SLURM_ARGS))
  assert '--ntasks-per-node=1 --gres=gpu:8' in commands[1]
  task = _commands(_bash('slurm_run.sh', '--dry-run', '--config=c.py', '--workdir=/w',
                         env={'LAUNCH_TASKS': 'per-node', 'LAUNCH_GPUS_PER_NODE': '8'}))
  assert task == ['JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7 python3 -m pipeline.main '
                  '--config=c.py --workdir=/w']


@pytest.mark.parametrize('script, args, message', [
    ('slurm.sbatch', ['--config', 'c.py'], 'missing --workdir'),
    ('slurm.sbatch', [*SLURM_ARGS, '--tasks', 'per-core'], '--tasks must be per-gpu, per-node'),
    ('slurm.sbatch', [*SLURM_ARGS, '--gpus-per-node', '0'], '--tasks per-gpu needs GPUs'),
    ('slurm.sbatch', [*SLURM_ARGS, '--tasks', '2'], 'is for CPU-only jobs'),
    ('slurm.sbatch', [*SLURM_ARGS, '--cpu-devices', '4'], 'is for CPU-only jobs'),
    ('slurm.sbatch', [*SLURM_ARGS, '--signal-before', '2m'], '--signal-before must be'),
    ('slurm_run.sh', [], 'missing the pipeline.main flags'),
    ('slurm_cluster.sh', [], 'missing the action'),
    ('slurm_cluster.sh', ['start', '--bogus'], "unknown argument '--bogus'"),
])
def test_slurm_bad_arguments_fail_with_a_message(script, args, message):
  result = _bash(script, *args)
  assert result.returncode == 2 and message in result.stderr, result.stderr


def test_local_dry_run_two_processes_of_four_devices():
  commands = _commands(_bash('local.sh', '--dry-run', '--num_processes', '2',
                             '--devices_per_process', '4', '--port', '5555', '--config',
                             'configs/x.py:smoke', '--workdir', '/tmp/run', '--',
                             '--config.seed=1'))
  assert commands[0] == 'mkdir -p /tmp/run/logs'
  for i in range(2):
    assert commands[1 + i] == (
        'env JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4 python3 '
        '-m pipeline.main --config=configs/x.py:smoke --workdir=/tmp/run --mode=train '
        f'--coordinator_address=127.0.0.1:5555 --num_processes=2 --process_id={i} '
        f'--config.seed=1 > /tmp/run/logs/process_{i}.log 2>&1 &')


@pytest.mark.parametrize('args, message', [
    (['--config', 'c.py'], 'missing --workdir'),
    (['--workdir', '/w'], 'missing --config'),
    (['--config', 'c.py', '--workdir', '/w', '--num_processes', '0'], '--num_processes must'),
])
def test_local_bad_arguments_fail_with_a_message(args, message):
  result = _bash('local.sh', *args)
  assert result.returncode == 2 and message in result.stderr, result.stderr


# A stand-in for pipeline.main: the real multihost module, no training. Its package
# directory comes first on PYTHONPATH and extends __path__ to the real package; the
# run starts outside the repo, whose own pipeline/ would otherwise come first.
STUB_MAIN = r'''
import os
from absl import app, flags
from pipeline import multihost
flags.DEFINE_string('config', '', '')
flags.DEFINE_string('workdir', '', '')
flags.DEFINE_string('mode', 'train', '')
flags.DEFINE_integer('fail_process', -1, '')

def main(_):
  multihost.initialize()
  print(multihost.topology_line(), 'pid', os.getpid(), flush=True)
  if multihost.jax.process_index() == flags.FLAGS.fail_process:
    raise RuntimeError('failing on purpose')
  multihost.barrier('end', 60)
  print('done', flush=True)

if __name__ == '__main__':
  app.run(main)
'''


def _run_local(tmp_path, *extra):
  stub = tmp_path / 'stub' / 'pipeline'
  stub.mkdir(parents=True)
  (stub / '__init__.py').write_text(f'__path__.append({str(REPO / "pipeline")!r})\n')
  (stub / 'main.py').write_text(STUB_MAIN)
  env = {'PYTHON': sys.executable, 'PYTHONPATH': f'{stub.parent}:{REPO}'}
  workdir = tmp_path / 'run'
  result = _bash('local.sh', '--num_processes', '2', '--devices_per_process', '2',
                 '--grace', '1', '--config', 'c.py', '--workdir', str(workdir), '--',
                 *extra, env=env, cwd=tmp_path, timeout=60)
  return result, [(workdir / 'logs' / f'process_{i}.log').read_text() for i in range(2)]


def test_local_runs_all_processes(tmp_path):
  result, logs = _run_local(tmp_path)
  assert result.returncode == 0 and not result.stderr, (result.stderr, logs)
  for i, log in enumerate(logs):
    assert f'process {i}/2, local devices 2, global devices 4' in log and 'done' in log


def test_local_names_the_failed_process_and_stops_the_rest(tmp_path):
  start = time.time()
  result, logs = _run_local(tmp_path, '--fail_process=1')
  assert result.returncode == 1, (result.stderr, logs)
  assert 'process 1 failed with status 1' in result.stderr
  assert 'RuntimeError: failing on purpose' in result.stderr  # The log's tail.
  assert time.time() - start < 30  # Not the 60 s barrier timeout of process 0.
  assert 'done' not in logs[0]
  survivor = int(logs[0].split(' pid ')[1].split()[0])
  deadline = time.time() + 10
  while _alive(survivor):
    assert time.time() < deadline, 'process 0 was not stopped'
    time.sleep(0.2)


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  # An exited child not yet reaped by init still answers; it is dead all the same.
  stat = pathlib.Path(f'/proc/{pid}/stat')
  return not (stat.exists() and stat.read_text().split(') ')[1].startswith('Z'))
