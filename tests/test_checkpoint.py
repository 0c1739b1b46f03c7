"""Preemption and resume, end to end with real processes.

Each run is `python -m pipeline.main` in a subprocess with 8 fake CPU devices, on a tiny
synthetic dataset whose epoch is 4 steps, so that interruptions land before the first
checkpoint, during an async save and after epoch boundaries. The loss log of every step
goes to metrics.jsonl (log_every_steps=1).
"""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from pipeline import checkpoint
from pipeline import config as config_lib
from pipeline import ledger

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 24
BASE_FLAGS = [
    '--config=configs/fashion_mnist_cnn.py:smoke',
    '--config.data.name=synthetic', '--config.data.path=',
    '--config.data.synthetic_train_size=256', '--config.data.synthetic_eval_size=128',
    '--config.model.name=cnn_bn',  # BatchNorm statistics and dropout rngs must resume too.
    '--config.train.log_every_steps=1', '--config.eval.batch_size=128',
    '--config.train.eval_every_steps=12', '--config.checkpoint.every_steps=8',
    f'--config.train.num_steps={NUM_STEPS}',
]


def _env(devices=8):
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  env['JAX_PLATFORMS'] = 'cpu'
  env['TF_CPP_MIN_LOG_LEVEL'] = '3'
  return env


def _start(workdir, *extra, devices=8, flags=tuple(BASE_FLAGS)):
  """`flags`: the run's own flags (tests/test_imported.py runs other configs)."""
  cmd = [sys.executable, '-m', 'pipeline.main', f'--workdir={workdir}', *flags, *extra]
  return subprocess.Popen(cmd, cwd=ROOT, env=_env(devices), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _run(workdir, *extra, devices=8, flags=tuple(BASE_FLAGS)):
  proc = _start(workdir, *extra, devices=devices, flags=flags)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  return out


def _losses(workdir):
  """step -> loss; a step logged twice (redone after a restore) keeps its last value."""
  losses = {}
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return losses
  with open(path, encoding='utf-8') as f:
    for line in f:
      record = json.loads(line)
      if 'train/loss' in record:
        losses[record['step']] = record['train/loss']
  return losses


def _final_params(workdir):
  manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'),
                                  item_names=('state', 'data', 'meta'))
  step = manager.latest_step()
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return step, restored['state']


def _assert_trees_equal(a, b):
  import jax  # pylint: disable=import-outside-toplevel
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _interrupt_at(workdir, step, sig=signal.SIGTERM, flags=tuple(BASE_FLAGS)):
  """Starts a run and sends `sig` once metrics.jsonl shows `step` done."""
  proc = _start(workdir, flags=flags)
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if max(_losses(workdir), default=0) >= step:
      proc.send_signal(sig)
      break
    time.sleep(0.01)
  out, _ = proc.communicate(timeout=240)
  return proc.returncode, out


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('uninterrupted'))
  _run(workdir)
  return workdir, _losses(workdir), _final_params(workdir)


def test_sigterm_at_random_steps_resumes_bit_identically(reference, tmp_path):
  ref_dir, ref_losses, (ref_step, ref_state) = reference
  assert sorted(ref_losses) == list(range(1, NUM_STEPS + 1))
  ref_ledger = ledger.read(ref_dir)
  assert [r['step'] for r in ref_ledger if 'digest' in r] == list(range(1, NUM_STEPS + 1))
  epochs = [r for r in ref_ledger if 'epoch' in r]
  # An epoch is 4 steps; every one of the 256 train examples once in each.
  assert [r['epoch'] for r in epochs] == list(range(NUM_STEPS // 4))
  assert all(r['distinct'] == r['examples'] == 256 for r in epochs), epochs
  rng = random.Random(0)
  # Before the first checkpoint (8), around the async save at 8, after epoch boundaries.
  targets = [rng.randint(1, 6), 8, rng.randint(13, 20)]
  for target in targets:
    workdir = str(tmp_path / f'stop_{target}')
    code, out = _interrupt_at(workdir, target)
    assert code == 0, out[-3000:]
    assert 'Stop requested' in out, out[-3000:]
    stopped_at = max(_losses(workdir))
    assert stopped_at < NUM_STEPS, f'the run finished before the signal (target {target})'
    _run(workdir)
    step, state = _final_params(workdir)
    assert step == ref_step == NUM_STEPS
    _assert_trees_equal(state, ref_state)  # Bit-identical parameters and statistics.
    assert _losses(workdir) == ref_losses, f'stopped at {stopped_at}'
    # The same examples in the same order, every lost step's record replaced.
    assert ledger.read(workdir) == ref_ledger, f'stopped at {stopped_at}'


def test_sigkill_during_async_save_falls_back(reference, tmp_path):
  _, ref_losses, (_, ref_state) = reference
  workdir = str(tmp_path / 'killed')
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  proc = _start(workdir)
  saw_tmp = False
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    names = os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []
    # Orbax writes a step into a temporary directory and renames it on commit.
    if any('tmp' in n for n in names) and any(n.isdigit() for n in names):
      proc.send_signal(signal.SIGKILL)
      saw_tmp = True
      break
  proc.communicate(timeout=60)
  assert saw_tmp, 'never caught a save of step > first in flight'
  _run(workdir)
  step, state = _final_params(workdir)
  assert step == NUM_STEPS
  _assert_trees_equal(state, ref_state)
  assert _losses(workdir) == ref_losses


def test_corrupt_newest_step_warns_and_falls_back(reference, tmp_path):
  ref_dir, ref_losses, _ = reference
  workdir = str(tmp_path / 'corrupt')
  shutil.copytree(ref_dir, workdir)
  newest = os.path.join(workdir, 'checkpoints', str(NUM_STEPS), 'state')
  truncated = 0
  for root, _, files in os.walk(newest):
    for name in files:
      with open(os.path.join(root, name), 'r+b') as f:
        f.truncate(max(0, os.path.getsize(f.name) // 3))
        truncated += 1
  assert truncated
  out = _run(workdir)
  assert f'Checkpoint step {NUM_STEPS} ' in out and 'falling back' in out, out[-3000:]
  assert 'Restored checkpoint step 16 ' in out, out[-3000:]
  losses = _losses(workdir)
  # Steps 17..24 were trained again from step 16 and retraced the uninterrupted run.
  assert all(losses[s] == ref_losses[s] for s in range(1, NUM_STEPS + 1))
  names = os.listdir(os.path.join(workdir, 'checkpoints'))
  assert any(n.startswith(f'{NUM_STEPS}.unreadable') for n in names), names


def test_elastic_resume_onto_other_devices_and_mesh(tmp_path):
  # Plain SGD: Adam's normalization amplifies the float reassociation of another device
  # count into visible loss differences; SGD keeps the runs within 1e-5, so any change of
  # the batches after the resume would show.
  sgd = ['--config.optimizer.name=sgd', '--config.optimizer.schedule=constant',
         '--config.optimizer.learning_rate=0.02', '--config.model.name=cnn']
  reference = str(tmp_path / 'reference')
  _run(reference, *sgd)
  ref_losses = _losses(reference)
  for devices, mesh in ((4, ('4', '1')), (8, ('8', '1'))):
    workdir = str(tmp_path / f'elastic_{devices}')
    _run(workdir, *sgd, '--config.train.num_steps=12', '--config.mesh.data=4',
         '--config.mesh.fsdp=2')
    out = _run(workdir, *sgd, f'--config.mesh.data={mesh[0]}',
               f'--config.mesh.fsdp={mesh[1]}', devices=devices)
    assert 'Restored checkpoint step 12' in out
    losses = _losses(workdir)
    assert sorted(losses) == list(range(1, NUM_STEPS + 1))
    np.testing.assert_allclose([losses[s] for s in range(1, NUM_STEPS + 1)],
                               [ref_losses[s] for s in range(1, NUM_STEPS + 1)], rtol=1e-5)


def test_changed_key_on_resume_is_listed():
  saved = checkpoint.config_to_dict(config_lib.base_config())
  config = config_lib.base_config()
  config.optimizer.learning_rate = 0.5
  config.model.name = 'mlp'
  config.train.num_steps = 5000  # Allow-listed: no error for this one.
  with pytest.raises(checkpoint.CheckpointError) as error:
    checkpoint.check_config_change(saved, config)
  message = str(error.value)
  assert "model.name: 'cnn' -> 'mlp'" in message
  assert 'optimizer.learning_rate: 0.001 -> 0.5' in message
  assert 'train.num_steps' not in message
  assert 'allow_config_change=True' in message
  config.checkpoint.allow_config_change = True
  checkpoint.check_config_change(saved, config)


def test_changed_key_on_resume_fails_the_run(reference, tmp_path):
  ref_dir, _, _ = reference
  workdir = str(tmp_path / 'changed')
  shutil.copytree(ref_dir, workdir)
  proc = _start(workdir, '--config.optimizer.learning_rate=0.5',
                f'--config.train.num_steps={NUM_STEPS + 4}')
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode != 0
  assert 'optimizer.learning_rate: 0.001 -> 0.5' in out, out[-3000:]
  assert max(_losses(workdir)) == NUM_STEPS  # Nothing trained, nothing overwritten.


def _sharded_state():
  import jax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  mesh = Mesh(np.array(jax.devices()), ('data',))
  weights = np.arange(64 * 1000, dtype=np.float32).reshape(64, 1000)
  return {'w': jax.device_put(weights, NamedSharding(mesh, PartitionSpec('data'))),
          'step': jax.device_put(np.int32(3))}


@pytest.mark.parametrize('device_snapshot', [True, False])
def test_save_holds_the_state_of_the_call(tmp_path, device_snapshot):
  """save() returns before the state is on disk and the loop donates the state to the next
  step at once: what is written must be the state as it was when save() was called."""
  import jax
  config = config_lib.base_config()
  config.checkpoint.device_snapshot = device_snapshot
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'checkpoints'), config)
  state = _sharded_state()
  expected = jax.device_get(state)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
  step_fn = jax.jit(lambda s: jax.tree.map(lambda x: x * 2 + 1, s), donate_argnums=0)
  ckpt.save(3, state, {'position': 3}, {})
  for _ in range(3):
    state = step_fn(state)  # Donates (and so invalidates) the saved buffers.
  ckpt.wait_until_finished()
  restored, data, _ = ckpt.restore(abstract)
  ckpt.close()
  np.testing.assert_array_equal(jax.device_get(restored['w']), expected['w'])
  assert int(restored['step']) == 3 and data == {'position': 3}
  assert restored['w'].sharding == abstract['w'].sharding


_FAILING_SAVE = """
import os, shutil, sys
import jax, numpy as np
from pipeline import checkpoint
from pipeline import config as config_lib
directory = sys.argv[1]
ckpt = checkpoint.Checkpointer(directory, config_lib.base_config())
ckpt.wait_until_finished()
shutil.rmtree(directory)
open(directory, 'w').write('a file where the checkpoint directory was')
try:
  ckpt.save(5, {'w': jax.device_put(np.ones(8, np.float32))}, {'position': 5}, {})
  ckpt.wait_until_finished()
except checkpoint.CheckpointError as e:
  print('CheckpointError:', e, flush=True)
# Orbax's signalling threads of the failed save wait out their own timeout at exit.
os._exit(0)
"""


def test_failed_background_save_names_the_step(tmp_path):
  directory = str(tmp_path / 'checkpoints')
  result = subprocess.run([sys.executable, '-c', _FAILING_SAVE, directory], cwd=ROOT,
                          env=_env(1), capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert re.search(r'CheckpointError: Saving checkpoint step 5 in .*checkpoints failed',
                   result.stdout), result.stdout + result.stderr[-3000:]


# In-process restore policy: which errors on the newest step fall back to an older one.

def _two_steps(directory):
  """A Checkpointer over `directory` holding steps 1 and 2 of a small state, and its
  abstract state (the shapes and shardings restore reads onto)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  config = config_lib.base_config()
  config.checkpoint.async_save = False
  ckpt = checkpoint.Checkpointer(str(directory), config)
  for step in (1, 2):
    state = {'w': jnp.full((16, 64), float(step)), 'b': jnp.arange(7.0) + step}
    ckpt.save(step, state, {'position': step}, {'goodput': {}})
  ckpt.wait_until_finished()
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                          state)
  return ckpt, abstract


def _files(step_dir, under='state'):
  for root, _, files in os.walk(os.path.join(step_dir, under)):
    for name in files:
      yield os.path.join(root, name)


def _truncate(step_dir):
  for path in _files(step_dir):
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 3)


def _flip_bytes(step_dir):  # Orbax/tensorstore: DATA_LOSS.
  for path in _files(step_dir):
    if os.sep + 'd' + os.sep in path:
      data = bytearray(open(path, 'rb').read())
      data[::7] = bytes(b ^ 0xFF for b in data[::7])
      open(path, 'wb').write(bytes(data))


def _zero_zstd_magic(step_dir):  # tensorstore: FAILED_PRECONDITION, "Unknown frame descriptor".
  for path in _files(step_dir):
    if os.sep + 'd' + os.sep in path:
      data = open(path, 'rb').read()
      assert b'\x28\xb5\x2f\xfd' in data, path  # OCDBT compresses every value with zstd.
      open(path, 'wb').write(data.replace(b'\x28\xb5\x2f\xfd', bytes(4)))


def _delete_chunks(step_dir):  # Orbax/tensorstore: NOT_FOUND.
  for path in list(_files(step_dir)):
    if os.sep + 'd' + os.sep in path:
      os.remove(path)


def _truncate_data_json(step_dir):
  for path in _files(step_dir, 'data'):
    with open(path, 'r+b') as f:
      f.truncate(3)


def _delete_state_item(step_dir):  # Orbax: the item "was not found in the checkpoint".
  shutil.rmtree(os.path.join(step_dir, 'state'))


@pytest.mark.parametrize('damage', [_truncate, _flip_bytes, _zero_zstd_magic, _delete_chunks,
                                    _truncate_data_json, _delete_state_item])
def test_unreadable_newest_step_falls_back_and_is_set_aside(tmp_path, damage):
  ckpt, abstract = _two_steps(tmp_path / 'checkpoints')
  damage(str(tmp_path / 'checkpoints' / '2'))
  state, data, meta = ckpt.restore(abstract)
  assert meta['step'] == 1 and data == {'position': 1}
  np.testing.assert_array_equal(np.asarray(state['w']), np.full((16, 64), 1.0))
  names = os.listdir(tmp_path / 'checkpoints')
  assert '2' not in names and any(n.startswith('2.unreadable') for n in names), names
  ckpt.close()


def test_transient_read_error_raises_and_sets_nothing_aside(tmp_path):
  """An I/O error (EIO) reading a good step is not corruption: resuming an older step
  would silently drop training and set a good checkpoint aside."""
  import errno  # pylint: disable=import-outside-toplevel
  ckpt, abstract = _two_steps(tmp_path / 'checkpoints')
  real_read, calls = ckpt._read, []  # pylint: disable=protected-access

  def flaky_read(step, **items):  # Every read of a step's files goes through _read.
    calls.append(step)
    if len(calls) == 1:
      raise OSError(errno.EIO, 'Input/output error', str(tmp_path / 'checkpoints' / '2'))
    return real_read(step, **items)

  ckpt._read = flaky_read  # pylint: disable=protected-access
  with pytest.raises(checkpoint.CheckpointError,
                     match=r'step 2 .*OSError.*Input/output error'):
    ckpt.restore(abstract)
  assert calls == [2]  # No older step was tried.
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1', '2']
  # The step was good: once the error is gone it restores.
  _, _, meta = ckpt.restore(abstract)
  assert meta['step'] == 2
  ckpt.close()


def test_shape_mismatch_raises_and_sets_nothing_aside(tmp_path):
  import jax  # pylint: disable=import-outside-toplevel
  ckpt, abstract = _two_steps(tmp_path / 'checkpoints')
  abstract['w'] = jax.ShapeDtypeStruct((8, 64), abstract['w'].dtype,
                                       sharding=abstract['w'].sharding)
  with pytest.raises(checkpoint.CheckpointError, match=r'step 2 .*not compatible with the '
                     r'stored shape'):
    ckpt.restore(abstract)
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1', '2']
  ckpt.close()
