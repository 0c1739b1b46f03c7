"""What TensorBoard shows besides scalars: input grids, misclassified examples, the config,
the model summary and hparams. Host-side and lead-process only; nothing here is jitted.
"""

from __future__ import annotations

import json
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

MAX_GRID = 64  # Images per grid: enough to see the data, small enough for event files.


def image_grid(images: np.ndarray, columns: int = 8) -> np.ndarray:
  """[N, H, W, C] float images (any range) -> one [1, rows*H, cols*W, C] grid in [0, 1]."""
  images = np.asarray(images[:MAX_GRID], np.float32)
  low, high = images.min(), images.max()
  images = (images - low) / max(high - low, 1e-6)  # Undo normalization for display.
  n, h, w, c = images.shape
  rows = -(-n // columns)
  grid = np.ones((rows * (h + 1) + 1, columns * (w + 1) + 1, c), np.float32)
  for i, image in enumerate(images):
    r, col = divmod(i, columns)
    grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + col * (w + 1):1 + col * (w + 1) + w] = image
  return grid[None]


def misclassified(inputs: np.ndarray, labels: np.ndarray, predictions: np.ndarray,
                  mask: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int]]] | None:
  """The wrongly classified (real, unpadded) images and their (label, prediction) pairs."""
  wrong = np.flatnonzero(mask & (labels != predictions))[:MAX_GRID]
  if not wrong.size:
    return None
  return inputs[wrong], list(zip(labels[wrong].tolist(), predictions[wrong].tolist()))


def model_summary(model: nn.Module, input_shape: tuple[int, ...], input_dtype: Any) -> str:
  """Flax's table of layers, shapes and parameter counts, as markdown-ish text."""
  # tabulate runs an eager init: a deliberate one-off transfer, before the loop starts.
  with jax.transfer_guard('allow'):
    example = jnp.zeros((1, *input_shape), input_dtype)
    table = nn.tabulate(
        model, {'params': jax.random.PRNGKey(0), 'dropout': jax.random.PRNGKey(1)},
        console_kwargs={'width': 160, 'force_terminal': False})(example, train=False)
  return '```\n' + table + '\n```'


def config_text(config) -> str:
  return '```\n' + json.dumps(json.loads(config.to_json()), indent=2) + '\n```'


def hparams(config) -> dict[str, Any]:
  """The config's scalar values, flattened ('optimizer.learning_rate': 0.001, ...)."""
  flat = {}

  def walk(node, prefix):
    for key, value in node.items():
      if isinstance(value, dict):
        walk(value, f'{prefix}{key}.')
      elif isinstance(value, (bool, int, float, str)):
        flat[f'{prefix}{key}'] = value
      else:
        flat[f'{prefix}{key}'] = str(value)

  walk(json.loads(config.to_json()), '')
  return flat
