"""The one place an NNX module becomes a Linen one, so NNX models need no other case.

`NNXModel(cls, kwargs)` is Flax's own bridge (`nnx.bridge.ToLinen`) with the calling
convention of the built-in models: `apply(variables, x, train=bool, rngs=..., mutable=...)`.
The NNX module is built as `cls(**kwargs, rngs=nnx.Rngs(...))` and called as `module(x)`
after `module.train()` or `module.eval()` (NNX's own switch for Dropout and BatchNorm).

Its state lands where a Linen model's does, as plain arrays (`metadata_fn=None`, no boxes):
`nnx.Param` in 'params' (top-level attributes as the first path level, so 'backbone/...'
works for freezing and partial restores), `nnx.BatchStat` in 'batch_stats'. So TrainState,
the steps, the shardings and the checkpoints are those of Linen models. The NNX rng
streams are not state here: every call rebuilds them from the Linen rngs the step passes
('dropout' folded with the step), so dropout masks are a function of the step alone and a
resumed run draws the uninterrupted run's masks.
"""

from __future__ import annotations

import functools
from typing import Any

from flax.nnx import bridge
import jax


def _call_in_mode(module: Any, x: jax.Array, *, train: bool) -> jax.Array:
  # ToLinen rebuilds the module on every apply, so the mode set here lasts for this call.
  if train:
    module.train()
  else:
    module.eval()
  return module(x)


class NNXModel(bridge.ToLinen):
  """An NNX module class (`nnx_class`, built with `kwargs`) as a Linen module."""
  metadata_fn: Any = None  # Plain arrays in the variables, as Linen modules have.

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:  # pylint: disable=arguments-differ
    return super().__call__(x, nnx_method=functools.partial(_call_in_mode, train=train))
