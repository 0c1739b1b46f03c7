"""Losses by name (`config.loss.name`), each with the metric that follows it.

A `Loss` turns the model's float32 outputs and the batch's labels into per-example losses,
the per-example quality the metrics average (right or wrong for classification, the mean
absolute error over the targets for regression), and the predictions predict mode writes
(class probabilities, or the regression outputs themselves).

  name                          task            outputs            labels
  softmax_cross_entropy         classification  num_classes        int class ids
  sigmoid_binary_cross_entropy  classification  1 (two classes)    int 0 / 1
  huber, l2, log_cosh           regression      num_classes        float [num_classes]
  cosine_distance               regression      num_classes        float [num_classes]

The losses are optax's; `l2` is optax's 0.5 * squared error, and the regression losses
average over the targets so that the loss of a 1-target and a 10-target task read alike.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax

CLASSIFICATION, REGRESSION = 'classification', 'regression'
# The metric each task reports beside the loss, e.g. 'eval/accuracy' or 'eval/mae'.
METRICS = {CLASSIFICATION: 'accuracy', REGRESSION: 'mae'}


@dataclasses.dataclass(frozen=True)
class Loss:
  """One named loss, ready for the step functions (pure, jit-friendly callables).

  Attributes:
    name: the `config.loss.name`.
    task: CLASSIFICATION or REGRESSION.
    num_outputs: the model's output width this loss needs.
    per_example: (outputs [B, num_outputs], labels) -> float32 losses [B].
    quality: (outputs, labels) -> {metric output name: [B]}, what the metric averages.
    predict: outputs -> class probabilities [B, classes], or the regression outputs.
  """
  name: str
  task: str
  num_outputs: int
  per_example: Callable[[jax.Array, jax.Array], jax.Array]
  quality: Callable[[jax.Array, jax.Array], dict[str, jax.Array]]
  predict: Callable[[jax.Array], jax.Array]

  @property
  def metric(self) -> str:
    return METRICS[self.task]


def _correct(logits, labels):
  return {'correct': logits.argmax(-1) == labels}


def softmax_cross_entropy(num_classes: int, label_smoothing: float = 0.0) -> Loss:
  def per_example(logits, labels):
    targets = jax.nn.one_hot(labels, num_classes)
    if label_smoothing:
      targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
  return Loss('softmax_cross_entropy', CLASSIFICATION, num_classes, per_example, _correct,
              jax.nn.softmax)


def sigmoid_binary_cross_entropy(num_classes: int, label_smoothing: float = 0.0) -> Loss:
  """Two classes from one logit, the probability of class 1 (the book's LSTM head)."""
  del num_classes  # Two; validate() says so before anything is built.

  def per_example(logits, labels):
    targets = labels.astype(jnp.float32)
    if label_smoothing:  # As optax.smooth_labels does for two one-hot columns.
      targets = targets * (1.0 - label_smoothing) + 0.5 * label_smoothing
    return optax.sigmoid_binary_cross_entropy(logits[:, 0].astype(jnp.float32), targets)

  def quality(logits, labels):
    return {'correct': (logits[:, 0] > 0).astype(labels.dtype) == labels}

  def predict(logits):
    # Two columns, like softmax's, so predict mode and the misclassified grid need no case.
    p1 = jax.nn.sigmoid(logits[:, 0])
    return jnp.stack([1.0 - p1, p1], axis=-1)
  return Loss('sigmoid_binary_cross_entropy', CLASSIFICATION, 1, per_example, quality,
              predict)


def _regression(name: str, elementwise: Callable[[jax.Array, jax.Array], jax.Array],
                num_targets: int) -> Loss:
  def per_example(outputs, targets):
    return elementwise(outputs.astype(jnp.float32), targets.astype(jnp.float32))

  def quality(outputs, targets):
    return {'abs_error': jnp.abs(outputs.astype(jnp.float32) - targets).mean(-1)}
  return Loss(name, REGRESSION, num_targets, per_example, quality, lambda outputs: outputs)


def huber(num_targets: int, delta: float = 1.0) -> Loss:
  return _regression(
      'huber', lambda p, t: optax.huber_loss(p, t, delta=delta).mean(-1), num_targets)


def l2(num_targets: int) -> Loss:
  return _regression('l2', lambda p, t: optax.l2_loss(p, t).mean(-1), num_targets)


def log_cosh(num_targets: int) -> Loss:
  return _regression('log_cosh', lambda p, t: optax.log_cosh(p, t).mean(-1), num_targets)


def cosine_distance(num_targets: int) -> Loss:
  """1 - cos(outputs, targets) per example: the direction of a target vector, not its
  length (so its MAE need not fall with it)."""
  return _regression('cosine_distance', optax.cosine_distance, num_targets)


TASKS = {
    'softmax_cross_entropy': CLASSIFICATION,
    'sigmoid_binary_cross_entropy': CLASSIFICATION,
    'huber': REGRESSION,
    'l2': REGRESSION,
    'log_cosh': REGRESSION,
    'cosine_distance': REGRESSION,
}
NAMES = tuple(TASKS)


def from_config(config, *, for_eval: bool = False) -> Loss:
  """The loss named by `config.loss.name`, sized by `config.data.num_classes` (for
  regression: the number of targets); `for_eval` leaves out label smoothing."""
  name, n = config.loss.name, config.data.num_classes
  if name not in TASKS:
    raise ValueError(f'config.loss.name={name!r} is invalid: allowed values are '
                     f'{", ".join(NAMES)}.')
  smoothing = 0.0 if for_eval else config.optimizer.label_smoothing
  return {
      'softmax_cross_entropy': lambda: softmax_cross_entropy(n, smoothing),
      'sigmoid_binary_cross_entropy': lambda: sigmoid_binary_cross_entropy(n, smoothing),
      'huber': lambda: huber(n, config.loss.huber_delta),
      'l2': lambda: l2(n),
      'log_cosh': lambda: log_cosh(n),
      'cosine_distance': lambda: cosine_distance(n),
  }[name]()


def num_outputs(config) -> int:
  """The output width the model must have for `config.loss.name`."""
  return from_config(config).num_outputs
