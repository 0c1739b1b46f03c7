"""Hidden-layer activations by name (`config.model.activation`) for the built-in models.

`get(name)` returns a function of one array. It is called inside a model's compact
`__call__`, so 'prelu' can create its learned slope there: each call site is its own
`nn.PReLU` submodule ('PReLU_0', 'PReLU_1', ... beside the layers it follows), with one
scalar slope initialised to 0.01, like 'leaky_relu' before training moves it.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax

_FIXED: dict[str, Callable[[jax.Array], jax.Array]] = {
    'relu': nn.relu,
    'gelu': nn.gelu,
    'elu': nn.elu,
    'celu': nn.celu,
    'selu': nn.selu,
    'silu': nn.silu,
    'softplus': nn.softplus,
    'soft_sign': nn.soft_sign,
    'log_sigmoid': nn.log_sigmoid,
    'leaky_relu': nn.leaky_relu,  # Slope 0.01 below zero.
}
NAMES = (*_FIXED, 'prelu')


def _prelu(x: jax.Array) -> jax.Array:
  # Created at the call, inside the calling module's compact method: a parameter of it.
  return nn.PReLU()(x)


def get(name: str) -> Callable[[jax.Array], jax.Array]:
  """The activation `name`; raises naming config.model.activation and the valid names."""
  if name == 'prelu':
    return _prelu
  if name not in _FIXED:
    raise ValueError(f'config.model.activation={name!r} is invalid: allowed values are '
                     f'{", ".join(NAMES)}.')
  return _FIXED[name]
