"""The book's CNN, optionally with BatchNorm and dropout ('cnn' and 'cnn_bn').

conv 32 3x3 -> [BatchNorm] -> act -> avg_pool 2 -> conv 64 3x3 -> [BatchNorm] -> act ->
avg_pool 2 -> flatten -> dense hidden_size -> act -> [Dropout] -> 'head'.

Parameter paths: 'backbone/Conv_0', 'backbone/Conv_1', 'backbone/Dense_0' (each
{kernel,bias}; the convolutions have no bias when BatchNorm follows), with BatchNorm
'backbone/BatchNorm_0', 'backbone/BatchNorm_1' ({scale,bias} in 'params', {mean,var} in
'batch_stats'), and 'head/{kernel,bias}'.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from pipeline import losses
from pipeline.models import activations

# Running averages that catch up within a few dozen steps (flax's default 0.99 needs
# hundreds), as in torchvision and flax's ImageNet example.
BATCH_NORM_MOMENTUM = 0.9


class CNNBackbone(nn.Module):
  """Two conv/pool stages and a dense layer; returns [batch, hidden_size] features."""
  hidden_size: int
  batch_norm: bool = False
  dtype: Any = jnp.float32
  axis_name: str | None = None  # pmap: BatchNorm statistics over the whole global batch.
  frozen_norm: bool = False  # Frozen backbone: BatchNorm normalizes with running averages.
  activation: str = 'relu'  # 'act' above: a name of activations.NAMES.

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    act = activations.get(self.activation)
    for features in (32, 64):
      # A bias in front of BatchNorm is cancelled by its mean subtraction.
      x = nn.Conv(features, (3, 3), use_bias=not self.batch_norm, dtype=self.dtype,
                  param_dtype=jnp.float32)(x)
      if self.batch_norm:
        x = nn.BatchNorm(use_running_average=not train or self.frozen_norm,
                         momentum=BATCH_NORM_MOMENTUM,
                         dtype=self.dtype, param_dtype=jnp.float32,
                         axis_name=self.axis_name)(x)
      x = act(x)
      x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.Dense(self.hidden_size, dtype=self.dtype, param_dtype=jnp.float32)(x)
    return act(x)


class CNN(nn.Module):
  """The backbone, dropout when `dropout_rate` > 0, and a linear classifier 'head'."""
  num_classes: int
  hidden_size: int = 256
  batch_norm: bool = False
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  axis_name: str | None = None  # pmap: BatchNorm statistics over the whole global batch.
  frozen_norm: bool = False  # Frozen backbone: BatchNorm normalizes with running averages.
  activation: str = 'relu'

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = CNNBackbone(self.hidden_size, self.batch_norm, self.dtype, self.axis_name,
                    self.frozen_norm, self.activation, name='backbone')(
        x, train=train)
    if self.dropout_rate > 0:
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name='head')(x)
    return x.astype(jnp.float32)


def from_config(config: ml_collections.ConfigDict, *, batch_norm: bool,
                axis_name: str | None = None, frozen_norm: bool = False) -> CNN:
  """'cnn' is the plain network; 'cnn_bn' adds BatchNorm and config.model.dropout_rate."""
  return CNN(num_classes=losses.num_outputs(config), hidden_size=config.model.hidden_size,
             batch_norm=batch_norm,
             dropout_rate=config.model.dropout_rate if batch_norm else 0.0,
             dtype=jnp.dtype(config.model.dtype), axis_name=axis_name,
             frozen_norm=frozen_norm, activation=config.model.activation)
