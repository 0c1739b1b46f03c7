"""Models by import path (pipeline/models/imported.py, nnx_adapter.py), end to end.

The NNX model is configs/fashion_mnist_nnx.py's; the Linen one is a module written next
to a config file of its own in a temporary folder (on PYTHONPATH, as a user's would be).
Each trains on Fashion-MNIST (the `:smoke` variant, 16 steps) in a subprocess; a second
run is stopped by SIGTERM and resumed by a third, and must end bit-identical to it;
evaluate and predict modes then run in this process on the first. The helpers that
start, stop and read those runs are tests/test_checkpoint.py's.
"""

import json
import os
import sys
import textwrap

import jax
import numpy as np
import pytest

from configs import fashion_mnist_nnx
from pipeline import config as config_lib
from pipeline import evaluate
from pipeline import predict
from pipeline import reporting
from pipeline import train
from pipeline.data import sources
from tests import test_checkpoint as runs
from tests import test_predict

NUM_STEPS = 16
SHORT = ['--config.data.name=fashion_mnist', f'--config.train.num_steps={NUM_STEPS}',
         '--config.train.log_every_steps=1', '--config.train.eval_every_steps=16',
         '--config.checkpoint.every_steps=8']

LINEN_MODULE = '''
import flax.linen as nn
import jax.numpy as jnp


class Net(nn.Module):
  """A user's Linen model: BatchNorm and dropout, so both must resume."""
  num_classes: int
  hidden: int = 32

  @nn.compact
  def __call__(self, x, *, train):
    x = nn.Conv(8, (3, 3), use_bias=False, name='conv')(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name='bn')(x))
    x = nn.avg_pool(x, (4, 4), strides=(4, 4)).reshape((x.shape[0], -1))
    x = nn.Dropout(0.2, deterministic=not train)(nn.relu(nn.Dense(self.hidden)(x)))
    return nn.Dense(self.num_classes, name='head')(x).astype(jnp.float32)
'''

LINEN_CONFIG = '''
"""A config file next to its model: python -m pipeline.main ... Expected: a test."""
from configs import fashion_mnist_cnn


def get_config(variant=None):
  config = fashion_mnist_cnn.get_config(variant)
  config.model.name = 'my_net:Net'
  config.model.kwargs = {'num_classes': 10, 'hidden': 32}
  return config
'''


def _config(config, **overrides):
  config.update_from_flattened_dict({'train.num_steps': NUM_STEPS, 'train.log_every_steps': 1,
                                     'train.eval_every_steps': 16,
                                     'checkpoint.every_steps': 8, **overrides})
  config_lib.validate(config, num_devices=jax.device_count(), num_processes=1)
  return config


def _losses(workdir):
  return [r['train/loss'] for r in reporting.read_jsonl(str(workdir)) if 'train/loss' in r]


@pytest.fixture
def user_model(tmp_path, monkeypatch):
  """A Linen model in a module of its own, and a config file beside it."""
  folder = tmp_path / 'user'
  folder.mkdir()
  (folder / 'my_net.py').write_text(textwrap.dedent(LINEN_MODULE))
  (folder / 'my_config.py').write_text(textwrap.dedent(LINEN_CONFIG))
  monkeypatch.syspath_prepend(str(folder))
  # The subprocesses find my_net the same way: PYTHONPATH, before the repository.
  monkeypatch.setenv('PYTHONPATH', os.pathsep.join([str(folder), runs.ROOT]))
  return folder


def _train_resume_evaluate_predict(config, flags, tmp_path):
  """Trains (the reference), then SIGTERM + resume, each a subprocess; evaluates and
  predicts with the reference. Returns the reference workdir and its final state."""
  reference = tmp_path / 'reference'
  runs._run(str(reference), flags=flags)
  losses = _losses(reference)
  assert len(losses) == NUM_STEPS
  assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.1, losses

  workdir = str(tmp_path / 'stopped')
  code, out = runs._interrupt_at(workdir, 5, flags=flags)
  assert code == 0 and 'Stop requested' in out, out[-3000:]
  stopped_at = max(runs._losses(workdir))
  assert stopped_at < NUM_STEPS, out[-3000:]
  runs._run(workdir, flags=flags)
  step, resumed = runs._final_params(workdir)
  assert step == NUM_STEPS
  _, state = runs._final_params(str(reference))
  runs._assert_trees_equal(resumed, state)  # Params, BatchNorm statistics, moments.
  assert list(runs._losses(workdir).values()) == losses, f'stopped at {stopped_at}'

  (last_eval,) = [r for r in reporting.read_jsonl(str(reference)) if 'eval/accuracy' in r]
  metrics = evaluate.evaluate_checkpoint(config, str(reference))
  assert metrics == {k: last_eval[k] for k in ('eval/loss', 'eval/accuracy')}
  assert metrics['eval/accuracy'] > 0.2  # Chance is 0.1; 16 steps of a small model.

  pixels = sources.read_idx(
      os.path.join(config.data.path, sources.FASHION_MNIST_FILES['test'][0]), ndim=3)
  paths = [str(tmp_path / f'{i}.png') for i in range(3)]
  for path, image in zip(paths, pixels):
    test_predict.Image.fromarray(image).save(path)
  config = config.copy_and_resolve_references()
  config.predict.input = paths[0]
  (record,) = predict.predict(config, str(reference))
  test_predict._check_records([record], sources.FASHION_MNIST_LABELS, paths[:1])
  return reference, state


def test_nnx_model_trains_resumes_evaluates_predicts_and_shards_like_one_device(tmp_path):
  config = _config(fashion_mnist_nnx.get_config('smoke'))
  flags = ('--config=configs/fashion_mnist_nnx.py:smoke', *SHORT)
  reference, state = _train_resume_evaluate_predict(config, flags, tmp_path)
  # The NNX state sits where a Linen model's does: the adapter adds no level or box.
  assert set(state['params']) == {'backbone', 'head'}
  assert set(state['batch_stats']['backbone']['norm']) == {'mean', 'var'}

  # 8-device jit against one device: the same run, to float32 reduction order.
  one = str(tmp_path / 'one_device')
  runs._run(one, devices=1, flags=flags)
  np.testing.assert_allclose(list(runs._losses(one).values()), _losses(reference), rtol=1e-5)
  _, one_state = runs._final_params(one)
  for a, b in zip(jax.tree.leaves(one_state), jax.tree.leaves(state)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_linen_model_by_import_path_trains_resumes_evaluates_predicts(user_model, tmp_path):
  sys.modules.pop('my_config', None)
  import my_config  # pylint: disable=import-outside-toplevel,import-error
  config = _config(my_config.get_config('smoke'))
  flags = (f'--config={user_model / "my_config.py"}:smoke', *SHORT)
  _, state = _train_resume_evaluate_predict(config, flags, tmp_path)
  assert {'conv', 'bn', 'head'} <= set(state['params'])


def _validate(config):
  config_lib.validate(config, num_devices=8, num_processes=1)


@pytest.mark.parametrize('name, match', [
    ('no_such_module:Net', r"config.model.name='no_such_module:Net' is invalid: module "
                           r"'no_such_module' does not import"),
    ('configs.fashion_mnist_nnx:Missing', r"has no attribute 'Missing'"),
    ('configs.fashion_mnist_nnx:get_config', r'get_config is not a flax.linen.Module or '
                                             r'flax.nnx.Module class'),
    ('configs.fashion_mnist_nnx:', r"expected 'package.module:ClassName'"),
])
def test_bad_import_paths_fail_validation_naming_the_key(name, match):
  config = fashion_mnist_nnx.get_config()
  config.model.name = name
  with pytest.raises(ValueError, match=match):
    _validate(config)


def test_kwargs_and_activation_mismatches_fail_validation_naming_the_key():
  config = fashion_mnist_nnx.get_config()
  config.model.kwargs.widht = 3
  with pytest.raises(ValueError, match=r"config.model.kwargs=.*'widht'.* is invalid for "
                                       r"config.model.name='configs.fashion_mnist_nnx:CNN'"):
    _validate(config)
  config = fashion_mnist_nnx.get_config()
  config.model.activation = 'gelu'
  with pytest.raises(ValueError, match=r"config.model.activation='gelu' is invalid: it "
                                       r'applies to the built-in models only'):
    _validate(config)
  config = fashion_mnist_nnx.get_config()
  config.model.dtype = 'bfloat16'
  with pytest.raises(ValueError, match=r"config.model.dtype='bfloat16' is invalid: it "
                                       r'applies to the built-in models only'):
    _validate(config)
  config = config_lib.base_config()
  config.model.kwargs = {'hidden': 3}
  with pytest.raises(ValueError, match=r"config.model.kwargs=\{'hidden': 3\} is invalid"):
    _validate(config)


def test_model_of_the_wrong_width_fails_before_compiling():
  config = fashion_mnist_nnx.get_config('smoke')
  # A new dict: setting kwargs.num_classes would set data.num_classes through the reference.
  config.model.kwargs = {'num_classes': 7}
  with pytest.raises(ValueError, match=r'returns outputs of shape \(1, 7\).*needs '
                                       r'\[batch, 10\]'):
    train.Trainer(config, workdir=None)


def test_kwargs_follow_their_reference_and_survive_the_saved_config():
  config = fashion_mnist_nnx.get_config()
  config.data.num_classes = 5
  assert config.model.kwargs.num_classes == 5
  # As evaluate and predict modes rebuild it from a checkpoint's metadata (JSON).
  saved = config_lib.from_saved(json.loads(config.to_json()))
  assert saved.model.kwargs.to_dict() == {'num_classes': 5, 'features': 32, 'hidden': 128,
                                          'dropout_rate': 0.3}
  _validate(saved)
