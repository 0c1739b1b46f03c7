"""gs:// workdirs against a real GCS emulator (fake-gcs-server via launch/gcs_emulator.py).

The runs are `python -m pipeline.main` subprocesses with the emulator's environment and a
fresh, empty working directory: every client (Orbax's tensorstore and google-cloud-storage,
TensorFlow's gs:// filesystem behind CLU and etils.epath) must reach the bucket, and
nothing may land on local disk. A short run is stopped by SIGTERM at a random step,
finished, evaluated and used to predict; its parameters must equal the same run on a
local workdir bit for bit. In-process tests cover the pieces a bucket makes different:
metrics.jsonl rewritten whole, an unreadable step set aside without a rename, the
vocabulary, predict inputs, and the error for a workdir with no checkpoint.
"""

import json
import os
import random
import re
import signal
import subprocess
import sys

from etils import epath
from google.cloud import storage as gcs
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorboard.util import tensor_util

from configs import fashion_mnist_cnn
from launch import gcs_emulator
from pipeline import checkpoint
from pipeline import ledger
from pipeline import predict
from pipeline import config as config_lib
from pipeline import reporting
from pipeline import storage
from pipeline import summaries
from pipeline.data import images as images_lib
from pipeline.data import sources
from pipeline.data import text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = 'pipeline-test'
NUM_STEPS = 12
NUM_IMAGES = 5
FLAGS = [f'--config={ROOT}/configs/fashion_mnist_cnn.py:smoke',
         f'--config.train.num_steps={NUM_STEPS}', '--config.train.log_every_steps=1',
         '--config.checkpoint.every_steps=4', f'--config.train.eval_every_steps={NUM_STEPS}',
         '--config.eval.batch_size=1000']
LOGGED_STEP = re.compile(r'\[(\d+)\] .*train/loss=')


@pytest.fixture(scope='module')
def gcs_env(tmp_path_factory):
  """The emulator's environment, also set in this process (restored afterwards).

  Starting it raises EmulatorError, failing every test here, if it cannot come up.
  """
  state_dir = str(tmp_path_factory.mktemp('gcs_emulator'))
  env = gcs_emulator.start(state_dir, buckets=(BUCKET,))
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    yield env
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    gcs_emulator.stop(state_dir)


def _start(cwd, workdir, *extra, mode='train', log=subprocess.PIPE):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3',
             XLA_FLAGS='--xla_force_host_platform_device_count=8')
  return subprocess.Popen(
      [sys.executable, '-m', 'pipeline.main', f'--workdir={workdir}', f'--mode={mode}',
       *FLAGS, *extra], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def _run(cwd, workdir, *extra, mode='train'):
  proc = _start(cwd, workdir, *extra, mode=mode)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-4000:]
  return out


def _interrupt_at(cwd, workdir, target):
  """Starts a run and sends SIGTERM once its log shows step `target` done."""
  proc = _start(cwd, workdir)
  lines, signalled = [], False
  for line in proc.stdout:  # The log, not the bucket: metrics.jsonl is uploaded lazily.
    lines.append(line)
    logged = LOGGED_STEP.search(line)
    if not signalled and logged and int(logged.group(1)) >= target:
      proc.send_signal(signal.SIGTERM)
      signalled = True
  proc.wait(timeout=60)
  return proc.returncode, ''.join(lines)


def _final_params(directory):
  manager = ocp.CheckpointManager(directory, item_names=('state', 'data', 'meta'),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step()
  state = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore()))['state']
  manager.close()
  return step, state


def _losses(workdir):
  """step -> train loss; a step logged twice keeps its last value."""
  return {r['step']: r['train/loss'] for r in reporting.read_jsonl(workdir)
          if 'train/loss' in r}


def _tree(directory):
  return sorted(os.path.relpath(os.path.join(root, name), directory)
                for root, dirs, files in os.walk(directory) for name in dirs + files)


def test_gs_workdir_trains_resumes_evaluates_predicts_like_local(gcs_env, tmp_path):
  import jax  # pylint: disable=import-outside-toplevel
  workdir = f'gs://{BUCKET}/run'
  local_cwd, gs_cwd, images = (tmp_path / n for n in ('local_cwd', 'gs_cwd', 'images'))
  for d in (local_cwd, gs_cwd, images):
    d.mkdir()
  pixels = sources.read_idx(os.path.join(fashion_mnist_cnn.get_config('smoke').data.path,
                                         sources.FASHION_MNIST_FILES['test'][0]), ndim=3)
  for i in range(NUM_IMAGES):
    Image.fromarray(pixels[i]).save(images / f'test_{i}.png')
  local = str(tmp_path / 'local_run')
  # The local reference runs beside the first gs:// attempt: the latter waits on the
  # emulator much of the time, and the test is shorter by a run.
  with open(tmp_path / 'local.log', 'w', encoding='utf-8') as log:
    local_proc = _start(local_cwd, local, log=log)
    target = random.randint(2, NUM_STEPS // 2)
    code, out = _interrupt_at(gs_cwd, workdir, target)
    assert local_proc.wait(timeout=300) == 0, (tmp_path / 'local.log').read_text()[-4000:]
  assert code == 0 and 'Stop requested (SIGTERM)' in out, out[-4000:]
  stopped = re.search(r'Stop requested \(SIGTERM\) at step (\d+)', out)
  stopped_at = int(stopped.group(1))
  assert target <= stopped_at < NUM_STEPS, (target, stopped_at)
  print(f'SIGTERM after step {target}; the run saved and stopped at step {stopped_at}.')
  out = _run(gs_cwd, workdir)
  assert f'Restored checkpoint step {stopped_at} from {workdir}/checkpoints' in out, out[-4000:]
  _run(gs_cwd, workdir, mode='evaluate')
  _run(gs_cwd, workdir, f'--config.predict.input={images}', mode='predict')

  # Nothing on local disk: no ./gs: directory, nothing at all in the runs' working dir.
  assert _tree(gs_cwd) == [], _tree(gs_cwd)
  assert not os.path.exists(os.path.join(ROOT, 'gs:'))

  # The same parameters, bit for bit, as the uninterrupted run on local disk.
  step, state = _final_params(f'{workdir}/checkpoints')
  local_step, local_state = _final_params(os.path.join(local, 'checkpoints'))
  assert step == local_step == NUM_STEPS
  leaves, local_leaves = jax.tree.leaves(state), jax.tree.leaves(local_state)
  assert len(leaves) == len(local_leaves) > 0
  for a, b in zip(leaves, local_leaves):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # metrics.jsonl kept the first attempt's records across the resume.
  losses = _losses(workdir)
  assert losses == _losses(local) and sorted(losses) == list(range(1, NUM_STEPS + 1))
  # The ledger object, rewritten without the lost steps on resume, equals the local run's.
  assert ledger.read(workdir) == ledger.read(local) != []

  # Every artifact is an object in the bucket.
  names = {b.name for b in gcs.Client().list_blobs(BUCKET, prefix='run/')}
  for name in ('metrics.jsonl', 'ledger.jsonl', 'loss.png', 'accuracy.png', 'eval_results.json',
               'predictions.jsonl', f'checkpoints/{NUM_STEPS}/commit_success.txt'):
    assert f'run/{name}' in names, sorted(names)
  assert any(n.startswith(f'run/checkpoints/{NUM_STEPS}/state/') for n in names)
  assert any(n.startswith('run/events.out.tfevents.') for n in names), sorted(names)
  print(f'{len(names)} objects under gs://{BUCKET}/run/; outside checkpoints/:',
        sorted(n for n in names if not n.startswith('run/checkpoints/')))
  png = epath.Path(f'{workdir}/loss.png').read_bytes()
  assert png.startswith(b'\x89PNG'), png[:8]
  results = json.loads(storage.read_text(f'{workdir}/eval_results.json'))
  final_eval = [r for r in reporting.read_jsonl(local) if 'eval/accuracy' in r][-1]
  assert results['step'] == NUM_STEPS
  assert results['eval/accuracy'] == final_eval['eval/accuracy']
  predictions = [json.loads(line) for line in
                 storage.read_text(f'{workdir}/predictions.jsonl').splitlines()]
  assert [os.path.basename(p['input']) for p in predictions] == [
      f'test_{i}.png' for i in range(NUM_IMAGES)]
  assert all(p['label'] in sources.FASHION_MNIST_LABELS for p in predictions)

  # TensorBoard reads the scalars back from gs://.
  accumulator = event_accumulator.EventAccumulator(workdir, size_guidance={'tensors': 0})
  accumulator.Reload()
  tb_losses = {e.step: float(tensor_util.make_ndarray(e.tensor_proto))
               for e in accumulator.Tensors('train/loss')}
  assert sorted(tb_losses) == list(range(1, NUM_STEPS + 1))
  np.testing.assert_allclose([tb_losses[s] for s in sorted(losses)],
                             [losses[s] for s in sorted(losses)], rtol=1e-6)


def test_move_tree_copies_then_deletes_in_a_bucket(gcs_env):
  source, target = f'gs://{BUCKET}/move/7', f'gs://{BUCKET}/move/7.unreadable-1'
  storage.write_text(f'{source}/commit_success.txt', 'done')
  storage.write_text(f'{source}/state/d/blob', 'x' * 1000)
  storage.move_tree(source, target)
  names = {b.name for b in gcs.Client().list_blobs(BUCKET, prefix='move/')}
  assert names == {'move/7.unreadable-1/commit_success.txt',
                   'move/7.unreadable-1/state/d/blob'}, names
  assert storage.read_text(f'{target}/state/d/blob') == 'x' * 1000
  storage.write_text(f'{source}/a', 'again')
  with pytest.raises(FileExistsError, match='7.unreadable-1 exists'):
    storage.move_tree(source, target)


def test_jsonl_writer_rewrites_the_object_and_keeps_earlier_records(gcs_env):
  path = f'gs://{BUCKET}/jsonl/metrics.jsonl'
  clock = [0.0]
  writer = reporting.JsonlWriter(path, upload_every_s=10.0, now=lambda: clock[0])
  writer.write_scalars(1, {'train/loss': 2.5})
  assert not storage.exists(path)  # Within the upload interval: not yet uploaded.
  clock[0] = 11.0
  writer.write_scalars(2, {'train/loss': 2.0})
  assert [r['step'] for r in reporting.read_jsonl(os.path.dirname(path))] == [1, 2]
  writer.close()
  resumed = reporting.JsonlWriter(path)  # A resumed run appends to the earlier records.
  resumed.write_scalars(3, {'train/loss': 1.5, 'eval/accuracy': 0.5})
  resumed.close()
  assert reporting.read_jsonl(os.path.dirname(path)) == [
      {'step': 1, 'train/loss': 2.5}, {'step': 2, 'train/loss': 2.0},
      {'step': 3, 'train/loss': 1.5, 'eval/accuracy': 0.5}]


def test_vocabulary_round_trips_through_a_bucket(gcs_env):
  vectorizer = text.Vectorizer.fit(['a good film', 'a bad film', 'good'], vocab_size=10,
                                   max_len=4)
  path = f'gs://{BUCKET}/vocab/vocabulary.json'
  vectorizer.save(path)
  loaded = text.Vectorizer.load(path)
  assert loaded.to_dict() == vectorizer.to_dict()
  np.testing.assert_array_equal(loaded(['good film']), vectorizer(['good film']))


def test_evaluate_on_an_empty_gs_workdir_names_it(gcs_env):
  from pipeline import evaluate  # pylint: disable=import-outside-toplevel
  workdir = f'gs://{BUCKET}/never_trained'
  with pytest.raises(checkpoint.CheckpointError, match='No checkpoint in workdir gs://'):
    evaluate.load_checkpoint(fashion_mnist_cnn.get_config('smoke'), workdir)


def test_unreadable_step_in_a_bucket_is_set_aside_and_the_previous_restored(gcs_env):
  import jax  # pylint: disable=import-outside-toplevel
  directory = f'gs://{BUCKET}/aside/checkpoints'
  ckpt = checkpoint.Checkpointer(directory, config_lib.base_config())
  state = {'w': jax.device_put(np.arange(8, dtype=np.float32))}
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                         sharding=x.sharding), state)
  ckpt.save(1, state, {'position': 1}, {})
  ckpt.save(2, jax.tree.map(lambda x: x + 1, state), {'position': 2}, {})
  ckpt.wait_until_finished()
  client = gcs.Client()
  # Names ending in / are the directory markers TensorFlow's mkdir writes: not data.
  corrupted = [b.name for b in client.list_blobs(BUCKET, prefix='aside/checkpoints/2/state/')
               if not b.name.endswith('/')]
  assert corrupted
  for name in corrupted:
    client.bucket(BUCKET).blob(name).upload_from_string(b'not a checkpoint')
  restored, data, _ = ckpt.restore(abstract)
  ckpt.close()
  np.testing.assert_array_equal(np.asarray(restored['w']), np.arange(8, dtype=np.float32))
  assert data == {'position': 1}
  names = [b.name for b in client.list_blobs(BUCKET, prefix='aside/checkpoints/')]
  assert not any(n.startswith('aside/checkpoints/2/') for n in names), names
  aside = [n for n in names if n.startswith('aside/checkpoints/2.unreadable-')]
  # Every object of the step, the corrupted ones included, is kept for inspection.
  assert {n.split('/', 3)[3] for n in aside} >= {n.split('/', 3)[3] for n in corrupted}, names


def test_predict_reads_image_inputs_from_a_bucket(gcs_env, tmp_path):
  pixels = sources.read_idx(os.path.join(fashion_mnist_cnn.get_config('smoke').data.path,
                                         sources.FASHION_MNIST_FILES['test'][0]), ndim=3)
  folder = f'gs://{BUCKET}/inputs'
  for i in range(3):
    Image.fromarray(pixels[i]).save(tmp_path / f'{i}.png')
    epath.Path(f'{folder}/{i}.png').write_bytes((tmp_path / f'{i}.png').read_bytes())
  storage.write_text(f'{folder}/notes.txt', 'not an image')
  inputs = predict.read_inputs(folder, text=False)
  assert inputs == [f'{folder}/{i}.png' for i in range(3)]
  for i, path in enumerate(inputs):
    np.testing.assert_array_equal(
        images_lib.decode(path, size=None, channels=1)[..., 0], pixels[i])
  with pytest.raises(ValueError, match='gs://.*/missing.png.*no such file'):
    predict.check_input(f'{folder}/missing.png')


def test_hparams_session_is_one_object_replaced_by_each_attempt(gcs_env):
  workdir = f'gs://{BUCKET}/hparams'
  config = fashion_mnist_cnn.get_config('smoke')
  for num_steps in (4, 8):  # Two attempts of one run, as a resume writes them.
    config.train.num_steps = num_steps
    reporting.write_session(workdir, *summaries.hparams_session(config, workdir, finished=True))
  names = [b.name for b in gcs.Client().list_blobs(BUCKET, prefix='hparams/')]
  # Besides the placeholder 'hparams/' that TensorFlow's writer makes, as for the scalars.
  events = [n for n in names if 'tfevents' in n]
  assert len(events) == 1 and events[0].endswith(reporting.SESSION_EVENTS_SUFFIX), names
  accumulator = event_accumulator.EventAccumulator(workdir)
  accumulator.Reload()
  start = hparams_metadata.parse_session_start_info_plugin_data(
      accumulator.SummaryMetadata(hparams_metadata.SESSION_START_INFO_TAG).plugin_data.content)
  assert start.hparams['train.num_steps'].number_value == 8
  assert start.group_name == workdir
