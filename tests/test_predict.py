"""Evaluate and predict modes on checkpoints of real smoke runs (covers evaluate.py's
`evaluate_checkpoint` and predict.py).

Each workload trains once per module, in-process; every test then restores its checkpoints.
"""

import io
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest

from configs import fashion_mnist_cnn
from configs import rotten_tomatoes_lstm
from pipeline import checkpoint
from pipeline import config as config_lib
from pipeline import evaluate
from pipeline import predict
from pipeline import reporting
from pipeline import train
from pipeline.data import sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_IMAGES = 11  # Not a multiple of the 8 devices: the last batch is padded.


def _train(config, workdir):
  config_lib.validate(config, num_devices=jax.device_count(), num_processes=1)
  train.train_and_evaluate(config, str(workdir))
  return reporting.read_jsonl(str(workdir))


@pytest.fixture(scope='module')
def fashion(tmp_path_factory):
  """20 steps with evals (and checkpoints with metrics) at 10 and 20."""
  config = fashion_mnist_cnn.get_config('smoke')
  config.train.num_steps = 20
  config.train.eval_every_steps = 10
  config.train.log_every_steps = 10
  config.checkpoint.every_steps = 10
  workdir = tmp_path_factory.mktemp('fashion')
  return config, workdir, _train(config, workdir)


@pytest.fixture(scope='module')
def tomatoes(tmp_path_factory):
  """10 steps, model chosen on validation, scored on test (eval.final_split)."""
  config = rotten_tomatoes_lstm.get_config('smoke')
  config.train.num_steps = 10
  config.train.eval_every_steps = 10
  config.train.log_every_steps = 10
  config.checkpoint.every_steps = 10
  workdir = tmp_path_factory.mktemp('tomatoes')
  return config, workdir, _train(config, workdir)


def _logits(state, inputs):
  variables = {'params': state.params}
  if state.batch_stats:
    variables['batch_stats'] = state.batch_stats
  return np.asarray(jax.jit(lambda v, x: state.apply_fn(v, x, train=False))(variables, inputs))


def _check_records(records, label_names, inputs):
  assert [r['input'] for r in records] == list(inputs)
  for r in records:
    assert r['label'] in label_names and label_names[r['label_id']] == r['label']
    probs = r['probabilities']
    assert list(probs) == list(label_names)
    assert abs(sum(probs.values()) - 1) < 1e-5
    assert max(probs, key=probs.get) == r['label']


def _read_output(path):
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def test_evaluate_reproduces_the_runs_eval_metrics(fashion):
  config, workdir, records = fashion
  evals = {r['step']: r for r in records if 'eval/accuracy' in r}
  assert sorted(evals) == [10, 20]
  best = max(evals, key=lambda s: evals[s]['eval/accuracy'])

  metrics = evaluate.evaluate_checkpoint(config, str(workdir))
  with open(os.path.join(workdir, 'eval_results.json'), encoding='utf-8') as f:
    results = json.load(f)
  assert results == {'step': best, **metrics}
  # Same checkpoint, same compiled step, same batches: bit-identical, not just close.
  assert metrics == {k: evals[best][k] for k in ('eval/loss', 'eval/accuracy')}
  assert reporting.read_jsonl(str(workdir))[-1] == results  # Also to the metric writers.

  other = 30 - best  # The step that is not the best one.
  config = config.copy_and_resolve_references()
  config.eval.checkpoint_step = other
  metrics = evaluate.evaluate_checkpoint(config, str(workdir))
  assert metrics == {k: evals[other][k] for k in ('eval/loss', 'eval/accuracy')}


def test_predict_images_match_the_eval_logits(fashion, tmp_path):
  config, workdir, _ = fashion
  pixels = sources.read_idx(
      os.path.join(config.data.path, sources.FASHION_MNIST_FILES['test'][0]), ndim=3)
  folder = tmp_path / 'images'
  folder.mkdir()
  paths = []
  for i in range(NUM_IMAGES):
    paths.append(str(folder / f'test_{i:02d}.png'))
    Image.fromarray(pixels[i]).save(paths[-1])
  (folder / 'notes.txt').write_text('not an image')  # Skipped: not an image suffix.
  config = config.copy_and_resolve_references()
  config.predict.input = str(folder)
  config.predict.batch_size = 5  # Rounded up to the 8 devices; two batches.
  records = predict.predict(config, str(workdir))

  _check_records(records, sources.FASHION_MNIST_LABELS, paths)
  assert _read_output(os.path.join(workdir, 'predictions.jsonl')) == records
  # The same examples as the eval pass reads them (test split, file order): the PNG round
  # trip and preprocess give the eval inputs exactly, and the labels are the logits' argmax.
  trainer, state, _ = evaluate.load_checkpoint(config, str(workdir))
  eval_inputs = next(iter(trainer.data.split_batches('test')))['input'][:NUM_IMAGES]
  np.testing.assert_array_equal(trainer.data.preprocess(paths), eval_inputs)
  logits = _logits(state, eval_inputs)
  assert [r['label_id'] for r in records] == list(logits.argmax(-1))
  probs = np.array([list(r['probabilities'].values()) for r in records])
  np.testing.assert_allclose(probs, jax.nn.softmax(logits), atol=1e-6)

  # One file, under pmap: the same answer as the first record under jit.
  config.parallelism = 'pmap'
  config.predict.input = paths[0]
  config.predict.output = str(tmp_path / 'out' / 'one.jsonl')
  (single,) = predict.predict(config, str(workdir))
  assert single['label_id'] == records[0]['label_id']
  np.testing.assert_allclose(list(single['probabilities'].values()), probs[0], atol=1e-6)
  assert _read_output(config.predict.output) == [single]


def test_text_evaluate_and_predict(tomatoes, tmp_path, monkeypatch):
  config, workdir, records = tomatoes
  metrics = evaluate.evaluate_checkpoint(config, str(workdir))
  (val,) = [r for r in records if 'eval/accuracy' in r]
  (test,) = [r for r in records if 'test/accuracy' in r]
  assert metrics == {'eval/loss': val['eval/loss'], 'eval/accuracy': val['eval/accuracy'],
                     'test/loss': test['test/loss'], 'test/accuracy': test['test/accuracy']}

  texts = ['A triumph: moving, funny and beautifully acted.', '',
           'Dull, lifeless and far too long.', 'An utterly forgettable mess.']
  path = tmp_path / 'reviews.txt'
  path.write_text('\n'.join(texts) + '\n', encoding='utf-8')
  config = config.copy_and_resolve_references()
  config.predict.input = str(path)
  records = predict.predict(config, str(workdir))
  texts = [t for t in texts if t]  # Blank lines are not inputs.
  _check_records(records, ('rotten', 'fresh'), texts)
  trainer, state, _ = evaluate.load_checkpoint(config, str(workdir))
  logits = _logits(state, trainer.data.preprocess(texts))
  assert [r['label_id'] for r in records] == list(logits.argmax(-1))

  monkeypatch.setattr('sys.stdin', io.StringIO('\n'.join(texts[:2])))
  config.predict.input = '-'
  config.predict.output = str(tmp_path / 'stdin.jsonl')
  from_stdin = predict.predict(config, str(workdir))
  assert from_stdin == records[:2]
  assert _read_output(config.predict.output) == from_stdin

  config.predict.input = str(tmp_path / 'blank.txt')
  (tmp_path / 'blank.txt').write_text('\n  \n', encoding='utf-8')
  with pytest.raises(ValueError, match='config.predict.input=.*no text'):
    predict.predict(config, str(workdir))


def test_errors_name_the_workdir_and_the_input(tmp_path):
  config = fashion_mnist_cnn.get_config('smoke')
  for workdir in (tmp_path / 'never_trained', tmp_path / 'empty'):
    if workdir.name == 'empty':
      (workdir / 'checkpoints').mkdir(parents=True)
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(str(workdir))):
      evaluate.evaluate_checkpoint(config, str(workdir))
    config.predict.input = str(tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(str(workdir))):
      predict.predict(config, str(workdir))
  assert not (tmp_path / 'never_trained').exists()  # Nothing created in a wrong workdir.

  config.predict.input = ''
  with pytest.raises(ValueError, match=r"config.predict.input='' is invalid"):
    predict.predict(config, str(tmp_path))
  config.predict.input = str(tmp_path / 'missing.png')
  with pytest.raises(ValueError, match='missing.png.*no such file'):
    predict.predict(config, str(tmp_path))


def _main(*args):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  return subprocess.run([sys.executable, '-m', 'pipeline.main', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def _tree(directory):
  return sorted(str(p.relative_to(directory)) for p in pathlib.Path(directory).rglob('*'))


def test_modes_run_from_the_workdir_alone_and_touch_no_checkpoint(fashion, tmp_path):
  """No --config: the saved config, overrides of the mode's keys, checkpoints read-only."""
  config, workdir, records = fashion
  evals = {r['step']: r for r in records if 'eval/accuracy' in r}
  # What a training run still writing would have there: a step Orbax has not committed.
  in_flight = workdir / 'checkpoints' / '30.orbax-checkpoint-tmp-1764620000000000'
  (in_flight / 'state').mkdir(parents=True)
  before = _tree(workdir / 'checkpoints')

  result = _main('--mode=evaluate', f'--workdir={workdir}', '--config.eval.checkpoint_step=10',
                 '--config.eval.batch_size=400')
  assert result.returncode == 0, result.stderr[-3000:]
  with open(workdir / 'eval_results.json', encoding='utf-8') as f:
    results = json.load(f)
  assert results['step'] == 10
  np.testing.assert_allclose(results['eval/accuracy'], evals[10]['eval/accuracy'], rtol=1e-6)
  np.testing.assert_allclose(results['eval/loss'], evals[10]['eval/loss'], rtol=1e-5)

  images = tmp_path / 'images'
  images.mkdir()
  test_images = sources.read_idx(
      os.path.join(config.data.path, sources.FASHION_MNIST_FILES['test'][0]), ndim=3)
  for i in range(3):
    Image.fromarray(test_images[i]).save(images / f'{i}.png')
  result = _main('--mode=predict', f'--workdir={workdir}', f'--config.predict.input={images}')
  assert result.returncode == 0, result.stderr[-3000:]
  _check_records(_read_output(workdir / 'predictions.jsonl'), sources.FASHION_MNIST_LABELS,
                 [str(images / f'{i}.png') for i in range(3)])
  assert _tree(workdir / 'checkpoints') == before  # Nothing deleted, renamed or added.
  shutil.rmtree(in_flight)


def test_modes_refuse_overrides_that_change_the_trained_run(fashion):
  _, workdir, _ = fashion
  with pytest.raises(checkpoint.CheckpointError, match=r'--config.model.hidden_size would '
                     r'change the run trained in .*refused: model.hidden_size'):
    evaluate.mode_config(str(workdir), config_lib.base_config(),
                         {'eval.batch_size': 100, 'model.hidden_size': 8}, config_given=False)
  # A whole --config must match the saved one outside the resumable keys.
  other = fashion_mnist_cnn.get_config('smoke')
  other.model.hidden_size = 8
  with pytest.raises(checkpoint.CheckpointError, match=r'model.hidden_size: 256 -> 8'):
    evaluate.mode_config(str(workdir), other, {}, config_given=True)
  config = evaluate.mode_config(str(workdir), config_lib.base_config(),
                                {'eval.batch_size': 100}, config_given=False)
  assert config.eval.batch_size == 100 and config.train.num_steps == 20
  assert config.data.random_crop_pad == 2 and isinstance(config.data.synthetic_shape, tuple)
