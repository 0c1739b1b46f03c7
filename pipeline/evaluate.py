"""Exact full-pass evaluation: every example counted once, padding masked out."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import jax
import numpy as np

from pipeline import steps


def evaluate(eval_step: Callable, state: steps.TrainState, batches: Iterable[dict[str, np.ndarray]],
             shard_batch: Callable, prefix: str = 'eval') -> dict[str, float]:
  """Runs `eval_step` over one pass of `batches` and returns `{prefix}/loss`, `/accuracy`.

  Metrics are merged on device as exact (total, count) pairs, so the result does not
  depend on the batch size, the padding of the last batch or the number of processes.
  """
  merged = None
  for batch in batches:
    metrics = eval_step(state, shard_batch(batch))
    merged = metrics if merged is None else merged.merge(metrics)
  if merged is None:
    raise ValueError(f'{prefix}: the evaluation split yielded no batches.')
  host: Any = jax.device_get(merged)
  return {f'{prefix}/{name}': float(value) for name, value in host.compute().items()}
