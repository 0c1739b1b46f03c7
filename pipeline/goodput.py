"""Where a run's wall time went, accumulated across restarts (the totals ride in the
checkpoint): compile, restore, checkpoint blocking, data waits and time lost to preemption
(steps trained again after a restore, at the run's mean step time; an estimate).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator

KINDS = ('compile', 'restore', 'checkpoint', 'data_wait', 'lost_to_preemption')


class Goodput:
  """Seconds per kind, plus the whole wall time; `scalars()` gives their fractions."""

  def __init__(self):
    self.seconds = {k: 0.0 for k in (*KINDS, 'wall')}
    self._start = time.perf_counter()
    self._wall_before = 0.0

  def resume(self, saved: dict[str, float]) -> None:
    """Adds the totals of earlier attempts, as stored in the restored checkpoint."""
    for kind in KINDS:
      self.seconds[kind] += float(saved.get(kind, 0.0))
    self._wall_before += float(saved.get('wall', 0.0))

  @contextlib.contextmanager
  def timing(self, kind: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
      yield
    finally:
      self.seconds[kind] += time.perf_counter() - start

  def add(self, kind: str, seconds: float) -> None:
    self.seconds[kind] += seconds

  def state(self) -> dict[str, float]:
    """The totals to store in a checkpoint."""
    self.seconds['wall'] = self._wall_before + time.perf_counter() - self._start
    return dict(self.seconds)

  def scalars(self) -> dict[str, Any]:
    totals = self.state()
    wall = max(totals['wall'], 1e-9)
    scalars = {f'goodput/{k}_fraction': totals[k] / wall for k in KINDS}
    scalars['goodput/productive_fraction'] = max(0.0, 1 - sum(totals[k] for k in KINDS) / wall)
    scalars['goodput/wall_seconds'] = wall
    return scalars
