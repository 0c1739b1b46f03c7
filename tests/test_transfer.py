"""Transfer learning: pretrain on Fashion-MNIST classes 0-4, fine-tune a new head on 5-9."""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from configs import fashion_mnist_resnet
from pipeline import reporting
from pipeline import train


def _config(classes, steps, **overrides):
  config = fashion_mnist_resnet.get_config('smoke')
  config.model.width = 16
  config.model.stage_sizes = (1, 1)
  config.data.classes = classes
  config.data.num_classes = len(classes)
  config.data.random_crop_pad = 0
  config.data.random_flip = False
  config.train.num_steps = steps
  config.train.eval_every_steps = steps
  config.checkpoint.every_steps = steps
  config.optimizer.learning_rate = 3e-3
  config.update_from_flattened_dict(overrides)
  return config


def _saved_state(workdir):
  manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'),
                                  item_names=('state', 'data', 'meta'))
  return manager.restore(manager.latest_step(), args=ocp.args.Composite(
      state=ocp.args.StandardRestore()))['state']


def _final_accuracy(workdir):
  return [r['eval/accuracy'] for r in reporting.read_jsonl(workdir) if 'eval/accuracy' in r][-1]


def _assert_equal_trees(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_frozen_backbone_fine_tuning_beats_a_random_backbone(tmp_path):
  pretrained = str(tmp_path / 'pretrain')
  train.train_and_evaluate(_config((0, 1, 2, 3, 4), 150), pretrained)
  source = _saved_state(pretrained)

  tuned = str(tmp_path / 'tuned')
  frozen = {'freeze': ('backbone',), 'optimizer.warmup_steps': 5,
            'optimizer.learning_rate': 1e-2}
  # Only the backbone comes from the source: the head starts fresh for the new classes.
  train.train_and_evaluate(_config((5, 6, 7, 8, 9), 60, init_from=pretrained,
                                   init_prefixes=('backbone',), **frozen), tuned)
  result = _saved_state(tuned)
  _assert_equal_trees(result['params']['backbone'], source['params']['backbone'])
  _assert_equal_trees(result['batch_stats'], source['batch_stats'])  # All BN is backbone.
  assert not np.array_equal(result['params']['head']['kernel'],
                            source['params']['head']['kernel'])

  scratch = str(tmp_path / 'scratch')
  train.train_and_evaluate(_config((5, 6, 7, 8, 9), 60, **frozen), scratch)
  assert _final_accuracy(tuned) > _final_accuracy(scratch) + 0.05, (
      _final_accuracy(tuned), _final_accuracy(scratch))
