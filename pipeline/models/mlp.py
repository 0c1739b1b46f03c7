"""A one-hidden-layer perceptron: flatten -> dense + activation (relu) -> 'head'.

Parameter paths: 'backbone/Dense_0/{kernel,bias}' and 'head/{kernel,bias}'.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from pipeline import losses
from pipeline.models import activations


class MLPBackbone(nn.Module):
  """Flattens any input and maps it to `hidden_size` features (`activation`, relu)."""
  hidden_size: int
  dtype: Any = jnp.float32
  activation: str = 'relu'  # A name of activations.NAMES.

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape((x.shape[0], -1))
    x = nn.Dense(self.hidden_size, dtype=self.dtype, param_dtype=jnp.float32)(x)
    return activations.get(self.activation)(x)


class MLP(nn.Module):
  """The backbone above plus a linear classifier named 'head'."""
  num_classes: int
  hidden_size: int
  dtype: Any = jnp.float32
  activation: str = 'relu'

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    del train  # Nothing here behaves differently in training.
    x = MLPBackbone(self.hidden_size, self.dtype, self.activation, name='backbone')(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name='head')(x)
    return x.astype(jnp.float32)


def from_config(config: ml_collections.ConfigDict) -> MLP:
  return MLP(num_classes=losses.num_outputs(config), hidden_size=config.model.hidden_size,
             dtype=jnp.dtype(config.model.dtype), activation=config.model.activation)
