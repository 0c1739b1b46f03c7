"""Input ops that run on the accelerator, inside the compiled steps.

Decoded images travel to the devices as uint8, a quarter of the bytes of float32, and are
normalized there: on the host, normalizing a 224x224 RGB batch was a pass over 4x the bytes
for work an accelerator does for free inside the first convolution's fusion.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np


class NormalizedInput:
  """A Flax model whose uint8 image input is scaled to float32 first: x * scale + offset.

  Only `init`, `init_with_output` and `apply` are wrapped (what `steps.init_state` and
  the steps use), so the parameters keep the model's own paths. Float inputs (predict
  mode's host-normalized ones) pass through unchanged.
  """

  def __init__(self, model: Any, scale: np.ndarray, offset: np.ndarray):
    self.model = model
    self._scale = np.asarray(scale, np.float32)
    self._offset = np.asarray(offset, np.float32)

  def init(self, rngs, x, *args, **kwargs):
    return self.model.init(rngs, self._normalize(x), *args, **kwargs)

  def init_with_output(self, rngs, x, *args, **kwargs):
    return self.model.init_with_output(rngs, self._normalize(x), *args, **kwargs)

  def apply(self, variables, x, *args, **kwargs):
    return self.model.apply(variables, self._normalize(x), *args, **kwargs)

  def _normalize(self, x):
    if x.dtype != jnp.uint8:
      return x
    return x.astype(jnp.float32) * self._scale + self._offset
