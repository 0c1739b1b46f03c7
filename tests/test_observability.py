"""What a run leaves behind for people: TensorBoard, metrics.jsonl, plots, profiles; and the
Keras-like features: NaN stops, early stopping, transfer learning with a frozen backbone."""

import glob
import os

import jax
import numpy as np
from PIL import Image
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from configs import fashion_mnist_cnn
from pipeline import checkpoint
from pipeline import reporting
from pipeline import train


def _smoke(**overrides):
  config = fashion_mnist_cnn.get_config('smoke')
  config.train.log_every_steps = 5
  config.update_from_flattened_dict(overrides)
  return config


@pytest.fixture(scope='module')
def smoke_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('smoke'))
  config = _smoke(**{'train.num_steps': 20, 'train.eval_every_steps': 10,
                     'profile.start_step': 6, 'profile.num_steps': 3})
  train.train_and_evaluate(config, workdir)
  return workdir


def test_tensorboard_holds_scalars_images_texts_hparams(smoke_run):
  acc = event_accumulator.EventAccumulator(smoke_run, size_guidance={'tensors': 0})
  acc.Reload()
  tags = set(acc.Tags()['tensors'])
  for tag in ('train/loss', 'train/accuracy', 'train/learning_rate', 'train/grad_norm',
              'eval/loss', 'eval/accuracy', 'perf/examples_per_sec',
              'perf/data_wait_fraction', 'goodput/compile_fraction', 'train/inputs',
              'eval/misclassified', 'config', 'model', '_hparams_/session_start_info'):
    assert tag in tags, (tag, sorted(tags))
  image = acc.Tensors('train/inputs')[0].tensor_proto
  assert len(tensor_util.make_ndarray(image)) >= 3  # width, height, PNG bytes
  config_text = tensor_util.make_ndarray(acc.Tensors('config')[0].tensor_proto).item()
  assert b'"fashion_mnist"' in config_text
  model_text = tensor_util.make_ndarray(acc.Tensors('model')[0].tensor_proto).item()
  assert b'backbone' in model_text and b'head' in model_text

  # metrics.jsonl has one line per write, equal to the event files' scalars.
  records = reporting.read_jsonl(smoke_run)
  for tag in ('train/loss', 'eval/accuracy'):
    from_jsonl = [(r['step'], r[tag]) for r in records if tag in r]
    from_events = [(e.step, float(tensor_util.make_ndarray(e.tensor_proto)))
                   for e in acc.Tensors(tag)]
    assert from_jsonl and len(from_jsonl) == len(from_events)
    for (s1, v1), (s2, v2) in zip(from_jsonl, from_events):
      assert s1 == s2 and v1 == pytest.approx(v2, rel=1e-6)


def test_learning_curve_plots_are_valid_pngs(smoke_run):
  for name in ('loss.png', 'accuracy.png'):
    with Image.open(os.path.join(smoke_run, name)) as image:
      image.verify()
      assert image.format == 'PNG' and image.size[0] > 100


def test_profile_window_writes_a_trace(smoke_run):
  traces = glob.glob(os.path.join(smoke_run, 'plugins', 'profile', '*', '*.xplane.pb'))
  assert traces and os.path.getsize(traces[0]) > 0


def test_nan_stops_naming_the_step_and_keeps_a_finite_checkpoint(tmp_path):
  workdir = str(tmp_path)
  config = _smoke(**{'train.num_steps': 40, 'checkpoint.every_steps': 5,
                     'optimizer.schedule': 'piecewise', 'optimizer.name': 'sgd',
                     'optimizer.learning_rate': 0.01, 'optimizer.boundaries': (12,),
                     'optimizer.scales': (1e9,)})  # Diverges once the lr explodes at 12.
  with pytest.raises(FloatingPointError, match=r'at step (1[2-9]|[2-3]\d)'):
    train.train_and_evaluate(config, workdir)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), config)
  trainer = train.Trainer(config, workdir)
  state, _, _ = ckpt.restore(trainer.abstract_state)
  assert 5 <= int(jax.device_get(state.step)) <= 12
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def test_early_stopping_stops_within_patience_and_keeps_the_best(tmp_path):
  workdir = str(tmp_path)
  # A zero learning rate is the perfect plateau: eval/loss never improves after eval 1.
  config = _smoke(**{'train.num_steps': 100, 'train.eval_every_steps': 5,
                     'optimizer.schedule': 'constant', 'optimizer.learning_rate': 1e-12,
                     'optimizer.name': 'sgd', 'early_stopping.metric': 'eval/accuracy',
                     'early_stopping.mode': 'max', 'early_stopping.patience': 2,
                     'checkpoint.max_to_keep': 1})
  state = train.train_and_evaluate(config, workdir)
  assert int(jax.device_get(state.step)) == 15  # Evals at 5 (best), 10, 15 (patience 2).
  evals = {r['step']: r['eval/accuracy'] for r in reporting.read_jsonl(workdir)
           if 'eval/accuracy' in r}
  assert sorted(evals) == [5, 10, 15]
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), config)
  best = ckpt.best_step()
  # The best checkpoint is kept on disk beside the newest (max_to_keep=1).
  assert evals[best] == max(evals.values())
  assert best in ckpt.manager.all_steps() and 15 in ckpt.manager.all_steps()
