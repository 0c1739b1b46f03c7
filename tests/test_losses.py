"""Losses by name (pipeline/losses.py): each lowers its loss on a task it fits, its metric
follows it, the invalid combinations fail in validate() naming the keys.

Classification runs on the synthetic labels (argmax of a fixed projection), regression on
the synthetic regression targets (that projection itself plus noise): both offline.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import fashion_mnist_cnn
from configs import rotten_tomatoes_lstm
from pipeline import config as config_lib
from pipeline import losses
from pipeline import reporting
from pipeline import train
from tests import test_sharding

REGRESSION = ('huber', 'l2', 'log_cosh', 'cosine_distance')


def _config(loss, num_classes):
  config = test_sharding._config('mlp')  # Synthetic data, a small MLP, batch 32.
  config.loss.name = loss
  config.data.num_classes = num_classes
  config.data.synthetic_shape = (16,)
  if loss in REGRESSION:
    config.data.synthetic_task = 'regression'
    config.checkpoint.best_metric, config.checkpoint.best_mode = 'eval/mae', 'min'
  config.optimizer.learning_rate = 1e-2
  config_lib.validate(config, num_devices=jax.device_count(), num_processes=1)
  return config


@pytest.mark.parametrize('loss, num_classes', [
    ('softmax_cross_entropy', 3), ('sigmoid_binary_cross_entropy', 2), ('huber', 4),
    ('l2', 4), ('log_cosh', 4), ('cosine_distance', 4)])
def test_every_loss_lowers_its_loss_and_reports_its_metric(loss, num_classes):
  config = _config(loss, num_classes)
  train_losses, state, trainer = test_sharding._losses(config, 30)
  assert np.mean(train_losses[-5:]) < 0.8 * np.mean(train_losses[:5]), train_losses
  metrics = trainer.evaluate(state)
  metric = 'eval/mae' if loss in REGRESSION else 'eval/accuracy'
  assert set(metrics) == {'eval/loss', metric}
  if loss in REGRESSION:
    assert metrics[metric] > 0  # A mean absolute error, over examples and targets.
  else:
    assert metrics[metric] > 0.6  # Chance: 1 / num_classes.


def test_regression_run_logs_mae_and_keeps_the_best_by_it(tmp_path):
  config = _config('huber', 4)
  config.train.num_steps, config.train.eval_every_steps = 8, 4
  config.checkpoint.every_steps, config.train.log_every_steps = 4, 2
  train.train_and_evaluate(config, str(tmp_path))
  assert (tmp_path / 'mae.png').exists() and not (tmp_path / 'accuracy.png').exists()
  records = reporting.read_jsonl(str(tmp_path))
  assert all('train/mae' in r for r in records if 'train/loss' in r)
  evals = [r for r in records if 'eval/loss' in r]
  assert [r['step'] for r in evals] == [4, 8] and all('eval/mae' in r for r in evals)
  assert evals[1]['eval/mae'] < evals[0]['eval/mae']


def test_sigmoid_bce_is_softmax_ce_of_the_logits_zero_and_z():
  """One logit z for class 1 is a two-class softmax over (0, z): the same loss, smoothed
  or not, the same predicted probabilities and the same right answers."""
  z = jnp.asarray([[-3.0], [-0.2], [0.0], [0.7], [4.0]])
  labels = jnp.asarray([0, 1, 1, 0, 1])
  two = jnp.concatenate([jnp.zeros_like(z), z], axis=1)
  for smoothing in (0.0, 0.2):
    sigmoid = losses.sigmoid_binary_cross_entropy(2, smoothing)
    softmax = losses.softmax_cross_entropy(2, smoothing)
    np.testing.assert_allclose(sigmoid.per_example(z, labels),
                               softmax.per_example(two, labels), rtol=1e-5)
  np.testing.assert_allclose(sigmoid.predict(z), softmax.predict(two), rtol=1e-5)
  # z = 0 is a tie: argmax says class 0, and so does z > 0.
  np.testing.assert_array_equal(sigmoid.quality(z, labels)['correct'],
                                softmax.quality(two, labels)['correct'])


def test_regression_losses_average_over_the_targets():
  outputs = jnp.asarray([[1.0, 2.0], [0.0, -1.0]])
  targets = jnp.asarray([[1.5, 0.0], [0.0, 1.0]])
  error = outputs - targets
  np.testing.assert_allclose(losses.l2(2).per_example(outputs, targets),
                             0.5 * (error**2).mean(-1))
  np.testing.assert_allclose(losses.log_cosh(2).per_example(outputs, targets),
                             np.log(np.cosh(error)).mean(-1), rtol=1e-6)
  huber = np.where(np.abs(error) <= 1, 0.5 * error**2, np.abs(error) - 0.5).mean(-1)
  np.testing.assert_allclose(losses.huber(2).per_example(outputs, targets), huber)
  cosine = 1 - (outputs * targets).sum(-1) / (np.linalg.norm(outputs, axis=-1)
                                              * np.linalg.norm(targets, axis=-1))
  np.testing.assert_allclose(losses.cosine_distance(2).per_example(outputs, targets), cosine,
                             rtol=1e-6)
  np.testing.assert_allclose(losses.l2(2).quality(outputs, targets)['abs_error'],
                             np.abs(error).mean(-1))


_FASHION, _TOMATOES = fashion_mnist_cnn.get_config, rotten_tomatoes_lstm.get_config


def _regression():
  return _config('l2', 4)


@pytest.mark.parametrize('make, overrides, match', [
    (_FASHION, {'loss.name': 'sigmoid_binary_cross_entropy'},
     r"config.loss.name='sigmoid_binary_cross_entropy' is invalid: one logit scores two "
     r'classes, but config.data.num_classes=10'),
    (_FASHION, {'loss.name': 'huber'},
     r"config.loss.name='huber' is invalid: a regression loss needs float targets, but "
     r"config.data.name='fashion_mnist' has class labels"),
    (_TOMATOES, {'loss.name': 'log_cosh'},
     r"config.loss.name='log_cosh' is invalid: .*'rotten_tomatoes' has class labels"),
    (_regression, {'loss.name': 'softmax_cross_entropy'},
     r"config.loss.name='softmax_cross_entropy' is invalid: "
     r"config.data.synthetic_task='regression' gives float targets"),
    (_regression, {'optimizer.label_smoothing': 0.1},
     r'config.optimizer.label_smoothing=0.1 is invalid: it smooths class labels'),
    (_regression, {'checkpoint.best_metric': 'eval/accuracy'},
     r"config.checkpoint.best_metric='eval/accuracy' is invalid: allowed values are "
     r'eval/loss, eval/mae'),
    (_FASHION, {'loss.name': 'mse'},
     r"config.loss.name='mse' is invalid: allowed values are softmax_cross_entropy, "
     r'sigmoid_binary_cross_entropy, huber'),
])
def test_invalid_combinations_fail_in_validate_naming_the_keys(make, overrides, match):
  config = make()
  config.update_from_flattened_dict(overrides)
  with pytest.raises(ValueError, match=match):
    config_lib.validate(config, num_devices=8, num_processes=1)
