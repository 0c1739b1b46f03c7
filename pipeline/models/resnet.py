"""ResNets v1.5 (stride in the 3x3 conv): 18/34/50 and a CIFAR-style 'resnet_small'.

Stage i has `width * 2**i` channels (times 4 at a bottleneck's output); every stage after
the first halves the resolution in its first block. The 'small' stem is one 3x3 stride-1
conv for 28-32 px inputs; the 'imagenet' stem is a 7x7/2 conv and a 3x3/2 max-pool.
Padding is symmetric as in torchvision, so its weights map one to one.

Parameter paths ({kernel} for convs, {scale,bias} for BatchNorm in 'params' and
{mean,var} for the same paths in 'batch_stats'):
  backbone/stem_conv, backbone/stem_bn
  backbone/stage{i}_block{j}/conv{k}, .../bn{k}   i, j from 0; k = 1..2 (basic), 1..3
                                                  (bottleneck)
  backbone/stage{i}_block{j}/proj_conv, .../proj_bn   the shortcut where the shape changes
  head/{kernel,bias}                              the classifier on average-pooled features
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from pipeline import losses
from pipeline.models import activations

# See cnn.py: running averages that catch up within a few dozen steps.
BATCH_NORM_MOMENTUM = 0.9


def _layers(dtype: Any, train: bool, axis_name: str | None,
            frozen_norm: bool) -> tuple[Any, Any]:
  """Conv and BatchNorm constructors shared by the stem and the blocks."""
  conv = functools.partial(nn.Conv, use_bias=False, dtype=dtype, param_dtype=jnp.float32)
  norm = functools.partial(nn.BatchNorm, use_running_average=not train or frozen_norm,
                           momentum=BATCH_NORM_MOMENTUM, epsilon=1e-5, dtype=dtype,
                           axis_name=axis_name,
                           param_dtype=jnp.float32)
  return conv, norm


class BasicBlock(nn.Module):
  """Two 3x3 convs; output channels = `filters`."""
  filters: int
  strides: int = 1
  dtype: Any = jnp.float32
  axis_name: str | None = None  # pmap: BatchNorm statistics over the whole global batch.
  frozen_norm: bool = False  # Frozen backbone: BatchNorm normalizes with running averages.
  activation: str = 'relu'  # Every hidden activation: a name of activations.NAMES.
  zero_init_residual: bool = False  # The block's last BatchNorm scale starts at 0.

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    conv, norm = _layers(self.dtype, train, self.axis_name, self.frozen_norm)
    act = activations.get(self.activation)
    last_norm = _last_norm(norm, self.zero_init_residual)
    s = (self.strides, self.strides)
    y = conv(self.filters, (3, 3), s, padding=((1, 1), (1, 1)), name='conv1')(x)
    y = act(norm(name='bn1')(y))
    y = conv(self.filters, (3, 3), padding=((1, 1), (1, 1)), name='conv2')(y)
    y = last_norm(name='bn2')(y)
    if x.shape[-1] != self.filters or self.strides != 1:
      x = norm(name='proj_bn')(conv(self.filters, (1, 1), s, name='proj_conv')(x))
    return act(x + y)


class BottleneckBlock(nn.Module):
  """1x1 reduce, 3x3 (strided), 1x1 expand; output channels = 4 * `filters`."""
  filters: int
  strides: int = 1
  dtype: Any = jnp.float32
  axis_name: str | None = None  # pmap: BatchNorm statistics over the whole global batch.
  frozen_norm: bool = False  # Frozen backbone: BatchNorm normalizes with running averages.
  activation: str = 'relu'  # Every hidden activation: a name of activations.NAMES.
  zero_init_residual: bool = False  # The block's last BatchNorm scale starts at 0.

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    conv, norm = _layers(self.dtype, train, self.axis_name, self.frozen_norm)
    act = activations.get(self.activation)
    last_norm = _last_norm(norm, self.zero_init_residual)
    s = (self.strides, self.strides)
    y = act(norm(name='bn1')(conv(self.filters, (1, 1), name='conv1')(x)))
    y = conv(self.filters, (3, 3), s, padding=((1, 1), (1, 1)), name='conv2')(y)
    y = act(norm(name='bn2')(y))
    y = last_norm(name='bn3')(conv(4 * self.filters, (1, 1), name='conv3')(y))
    if x.shape[-1] != 4 * self.filters or self.strides != 1:
      x = norm(name='proj_bn')(conv(4 * self.filters, (1, 1), s, name='proj_conv')(x))
    return act(x + y)


def _last_norm(norm, zero_init: bool):
  # A zero scale makes each residual branch start as nothing, so the network starts as its
  # shortcut path: Goyal et al. 2017 ("Accurate, Large Minibatch SGD"), section 5.1.
  return functools.partial(norm, scale_init=nn.initializers.zeros) if zero_init else norm


_BLOCKS = {'basic': BasicBlock, 'bottleneck': BottleneckBlock}


class ResNetBackbone(nn.Module):
  """Stem and residual stages; returns globally average-pooled features [batch, C]."""
  stage_sizes: Sequence[int]
  block: str = 'basic'
  width: int = 64
  stem: str = 'small'
  dtype: Any = jnp.float32
  axis_name: str | None = None  # pmap: BatchNorm statistics over the whole global batch.
  frozen_norm: bool = False  # Frozen backbone: BatchNorm normalizes with running averages.
  activation: str = 'relu'  # Every hidden activation: a name of activations.NAMES.
  zero_init_residual: bool = False  # Each block's last BatchNorm scale starts at 0.

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    conv, norm = _layers(self.dtype, train, self.axis_name, self.frozen_norm)
    act = activations.get(self.activation)
    if self.stem == 'imagenet':
      x = conv(self.width, (7, 7), (2, 2), padding=((3, 3), (3, 3)), name='stem_conv')(x)
      x = act(norm(name='stem_bn')(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    elif self.stem == 'small':
      x = conv(self.width, (3, 3), padding=((1, 1), (1, 1)), name='stem_conv')(x)
      x = act(norm(name='stem_bn')(x))
    else:
      raise ValueError(f"config.model.stem={self.stem!r} is invalid: use 'small' or 'imagenet'.")
    block = _BLOCKS[self.block]
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = block(self.width * 2**i, strides, self.dtype, self.axis_name, self.frozen_norm,
                  self.activation, self.zero_init_residual, name=f'stage{i}_block{j}')(
            x, train=train)
    return jnp.mean(x, axis=(1, 2))


class ResNet(nn.Module):
  """`ResNetBackbone` plus a linear classifier named 'head'."""
  num_classes: int
  stage_sizes: Sequence[int]
  block: str = 'basic'
  width: int = 64
  stem: str = 'small'
  dtype: Any = jnp.float32
  axis_name: str | None = None  # pmap: BatchNorm statistics over the whole global batch.
  frozen_norm: bool = False  # Frozen backbone: BatchNorm normalizes with running averages.
  activation: str = 'relu'  # Every hidden activation: a name of activations.NAMES.
  zero_init_residual: bool = False  # Each block's last BatchNorm scale starts at 0.

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = ResNetBackbone(tuple(self.stage_sizes), self.block, self.width, self.stem,
                       self.dtype, self.axis_name, self.frozen_norm, self.activation,
                       self.zero_init_residual,
                       name='backbone')(x, train=train)
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name='head')(x)
    return x.astype(jnp.float32)


def from_config(config: ml_collections.ConfigDict, *, block: str,
                stage_sizes: Sequence[int] | None = None, axis_name: str | None = None,
                frozen_norm: bool = False) -> ResNet:
  """Builds a ResNet; `stage_sizes` None means config.model.stage_sizes (resnet_small)."""
  if stage_sizes is None:
    stage_sizes = config.model.stage_sizes
  return ResNet(num_classes=losses.num_outputs(config), stage_sizes=tuple(stage_sizes),
                block=block, width=config.model.width, stem=config.model.stem,
                dtype=jnp.dtype(config.model.dtype), axis_name=axis_name,
                frozen_norm=frozen_norm, activation=config.model.activation,
                zero_init_residual=config.model.zero_init_residual)
