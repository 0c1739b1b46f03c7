"""Every config file loads and validates; each validation rule names its key."""

import glob
import importlib.util
import json
import os

import sys

import ml_collections
import numpy as np
import pytest

from configs import fashion_mnist_cnn
from configs import imagenet_resnet50
from pipeline import config as config_lib

CONFIG_FILES = sorted(p for p in glob.glob('configs/*.py') if not p.endswith('__init__.py'))


@pytest.fixture(scope='module', autouse=True)
def imagenet_smoke_jpegs():
  """The generated JPEG folder that configs/imagenet_resnet50.py:smoke reads, as its
  docstring writes it."""
  sys.path.insert(0, 'bench')
  try:
    import jpegs  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.remove('bench')
  jpegs.write_folder(imagenet_resnet50.SMOKE_JPEGS, 64, classes=4, size=(96, 72))


def _load(path, variant=None):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def _needs_external_data(config):
  return config.data.name == 'tfds'


@pytest.mark.parametrize('path', CONFIG_FILES)
def test_config_files_load_and_validate(path):
  for variant in (None, 'smoke'):
    config = _load(path, variant)
    assert set(config.keys()) == set(config_lib.base_config().keys()), path
    if variant == 'smoke' or not _needs_external_data(config):
      config_lib.validate(config, num_devices=8, num_processes=1)


@pytest.mark.parametrize('path', CONFIG_FILES)
def test_smoke_variants_build_a_trainer(path):
  """Data, model, optimizer and compiled steps build (nothing runs): catches configs whose
  keys are valid alone but not together, e.g. warmup longer than the run."""
  from pipeline import train  # pylint: disable=import-outside-toplevel
  config = _load(path, 'smoke')
  trainer = train.Trainer(config, workdir=None)  # Raises on, e.g., warmup >= num_steps.
  assert trainer.num_steps == config.train.num_steps


def test_imagenet_smoke_trains_on_generated_jpegs_through_the_image_folder_path(tmp_path):
  from pipeline import train  # pylint: disable=import-outside-toplevel
  config = _load('configs/imagenet_resnet50.py', 'smoke')
  full = _load('configs/imagenet_resnet50.py')
  # The recipe is the full config's: only the sizes and the source differ.
  for key in ('inception_crop', 'random_flip', 'eval_center_crop', 'crop_padding', 'mean',
              'std'):
    assert config.data[key] == full.data[key], key
  assert config.model.zero_init_residual and config.optimizer.weight_decay_coupled
  assert config.data.name == 'image_folder'
  train.train_and_evaluate(config, str(tmp_path))
  records = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl', encoding='utf-8')]
  losses = [r['train/loss'] for r in records if 'train/loss' in r]
  accuracies = [r['eval/accuracy'] for r in records if 'eval/accuracy' in r]
  assert losses and np.all(np.isfinite(losses)) and accuracies
  # The folder was listed once for the run; ImageNet's fixed mean/std left nothing to measure.
  assert os.path.exists(tmp_path / 'image_folder_files.json.gz')
  assert not os.path.exists(tmp_path / 'image_stats.json.gz')


def test_every_file_has_documented_command():
  for path in CONFIG_FILES:
    text = open(path, encoding='utf-8').read()
    assert 'python -m pipeline.main' in text and 'Expected' in text, path


def _base(**overrides):
  config = config_lib.base_config()
  config.update_from_flattened_dict(overrides)
  return config


@pytest.mark.parametrize('overrides, match', [
    ({'model.name': 'vgg'}, r'config.model.name=.vgg.*allowed values are mlp, cnn'),
    ({'data.name': 'mnist'}, r'config.data.name=.mnist.*allowed values are fashion_mnist'),
    ({'optimizer.name': 'adamax'}, r'config.optimizer.name=.adamax.*allowed values.*adabelief'),
    ({'optimizer.schedule': 'linear'}, r'optimizer.schedule.*constant, warmup_cosine'),
    ({'train.global_batch_size': 0}, r'train.global_batch_size=0.*must be > 0'),
    ({'eval.batch_size': -5}, r'eval.batch_size=-5.*must be > 0'),
    ({'train.eval_every_steps': 0}, r'train.eval_every_steps=0.*must be > 0'),
    ({'checkpoint.every_steps': -1}, r'checkpoint.every_steps=-1.*must be > 0'),
    ({'train.global_batch_size': 100}, r'train.global_batch_size=100.*divisible by the 8'),
    ({'mesh.data': 3, 'mesh.fsdp': 2}, r'config.mesh=\(3, 2\).*multiply to the 8 devices'),
    ({'mesh.data': -1, 'mesh.fsdp': -1}, r'at most one of mesh.data and mesh.fsdp'),
    ({'fsdp_min_size': -1}, r'config.fsdp_min_size=-1.*must be >= 0'),
    ({'mesh.dcn_data': 0}, r'config.mesh.dcn_data=0.*must be >= 1'),
    ({'mesh.dcn_data': 2}, r'config.mesh.dcn_data=2.*must divide .* the 1 processes'),
    ({'data.path': '/nonexistent/fmnist'}, r'data.path=.*/nonexistent/fmnist.*no such '
     r'directory.*apt-get install dataset-fashion-mnist'),
    ({'data.name': 'csv_text', 'data.path': '/nonexistent.csv'}, r'data.path.*no such file'),
    ({'data.name': 'tfds'}, r'data.tfds_name'),
    ({'optimizer.grad_accum_steps': 3}, r'optimizer.grad_accum_steps=3'),
    ({'optimizer.boundaries': (10,)}, r'optimizer.scales'),
    ({'watchdog.timeout_s': -1.0}, r'config.watchdog.timeout_s=-1.0.*must be >= 0'),
])
def test_validation_names_the_key(overrides, match):
  with pytest.raises(ValueError, match=match):
    config_lib.validate(_base(**overrides), num_devices=8, num_processes=1)


def test_batch_must_divide_over_processes():
  config = _base(**{'train.global_batch_size': 24, 'mesh.data': 3, 'mesh.fsdp': 1})
  with pytest.raises(ValueError, match=r'train.global_batch_size=24.*divisible by the 5 proc'):
    config_lib.validate(config, num_devices=3, num_processes=5)


def test_wrong_type_is_named():
  # A config built by hand (not from base_config) escapes ml_collections' type safety.
  raw = config_lib.base_config().to_dict()
  raw['train']['log_every_steps'] = '10'
  with pytest.raises(ValueError, match=r'train.log_every_steps=.10.*expected an int'):
    config_lib.validate(ml_collections.ConfigDict(raw), num_devices=8, num_processes=1)


def test_mesh_shape_fills_the_rest():
  assert config_lib.mesh_shape(_base(**{'mesh.data': -1, 'mesh.fsdp': 2}), 8) == (4, 2)
  assert config_lib.mesh_shape(_base(**{'mesh.data': 2, 'mesh.fsdp': -1}), 8) == (2, 4)


@pytest.mark.parametrize('overrides, match', [
    ({'data.channels': 2}, r'config.data.channels=2.*allowed values are 1, 3'),
    ({'optimizer.warmup_steps': -1}, r'config.optimizer.warmup_steps=-1.*must be >= 0'),
    ({'optimizer.clip_grad_norm': -0.5}, r'config.optimizer.clip_grad_norm=-0.5.*must be >= 0'),
    ({'optimizer.weight_decay': -0.1}, r'config.optimizer.weight_decay=-0.1.*must be >= 0'),
    ({'optimizer.label_smoothing': -0.1}, r'optimizer.label_smoothing=-0.1.*must be >= 0'),
    ({'optimizer.momentum': -0.9}, r'config.optimizer.momentum=-0.9.*must be >= 0'),
    ({'optimizer.end_lr_fraction': -1.0}, r'optimizer.end_lr_fraction=-1.0.*must be >= 0'),
    ({'optimizer.dp_noise_multiplier': -1.0}, r'optimizer.dp_noise_multiplier.*must be >= 0'),
    ({'optimizer.dp_l2_clip': 0.0}, r'config.optimizer.dp_l2_clip=0.0.*must be > 0'),
    ({'early_stopping.min_delta': -0.01}, r'early_stopping.min_delta=-0.01.*must be >= 0'),
    ({'data.random_crop_pad': -2}, r'config.data.random_crop_pad=-2.*must be >= 0'),
    ({'data.image_size': -32}, r'config.data.image_size=-32.*must be >= 0'),
    ({'data.num_workers': -2}, r'config.data.num_workers=-2.*must be >= 0, or -1 for the default'),
    ({'checkpoint.best_metric': 'eval/acc'},
     r"config.checkpoint.best_metric='eval/acc'.*allowed values are .*eval/accuracy"),
    ({'early_stopping.metric': 'val/loss'},
     r"config.early_stopping.metric='val/loss'.*allowed values are .*eval/loss"),
    ({'optimizer.name': 'dpsgd', 'model.name': 'cnn', 'parallelism': 'pmap'},
     r"config.parallelism='pmap'.*optimizer.name='dpsgd'.*per-example"),
    ({'optimizer.name': 'dpsgd', 'model.name': 'cnn_bn'},
     r"config.model.name='cnn_bn'.*optimizer.name='dpsgd'.*BatchNorm"),
    ({'optimizer.name': 'dpsgd', 'model.name': 'resnet18'},
     r"config.model.name='resnet18'.*optimizer.name='dpsgd'.*BatchNorm"),
])
def test_more_validation_names_the_key(overrides, match):
  with pytest.raises(ValueError, match=match):
    config_lib.validate(_base(**overrides), num_devices=8, num_processes=1)


def test_metrics_the_run_produces_are_accepted():
  # Each eval metric the run writes may pick the best checkpoint and steer early stopping.
  from pipeline import steps  # pylint: disable=import-outside-toplevel
  names = steps.eval_metric_names()
  assert {'eval/loss', 'eval/accuracy'} <= set(names), names
  for name in names:
    config_lib.validate(_base(**{'checkpoint.best_metric': name,
                                 'early_stopping.metric': name}),
                        num_devices=8, num_processes=1)
  # DP-SGD itself is fine with a model without BatchNorm under jit.
  config_lib.validate(_base(**{'optimizer.name': 'dpsgd', 'model.name': 'cnn'}),
                      num_devices=8, num_processes=1)


def test_config_file_assigning_a_wrong_type_names_the_section(tmp_path):
  """Loaded the way --config loads it: ml_collections' own type check must name the key
  with its section, not only 'width'."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  path = tmp_path / 'bad.py'
  path.write_text('from pipeline import config as config_lib\n\n\n'
                  'def get_config():\n'
                  '  config = config_lib.base_config()\n'
                  "  config.model.width = 'x'\n"
                  '  return config\n')
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'test', flag_values=flag_values)
  with pytest.raises(flags.IllegalFlagValueError, match=r"config.model.width='x'.*expected "
                     r'int, got str'):
    flag_values(['prog', f'--config={path}'])


def test_a_saved_config_reads_back_with_the_schemas_types_and_new_keys():
  """What evaluate and predict modes run with: the JSON of a checkpoint's metadata."""
  saved = json.loads(fashion_mnist_cnn.get_config('smoke').to_json())
  del saved['mesh']['dcn_data']  # A run saved before this key existed.
  del saved['profile']
  config = config_lib.from_saved(saved)
  assert config.mesh.dcn_data == 1 and config.profile.num_steps == 5  # The defaults.
  assert config.data.random_crop_pad == 2 and config.train.num_steps == 30
  assert isinstance(config.data.synthetic_shape, tuple)
  config_lib.validate(config, num_devices=8, num_processes=1)
