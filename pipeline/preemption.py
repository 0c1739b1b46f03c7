"""Stop signals: turn SIGTERM, SIGINT and SLURM's USR1 into "save at a step, then exit".

When `jax.distributed` is up, JAX's preemption sync manager owns SIGTERM and makes
`CheckpointManager.reached_preemption(step)` true on every host at the same step; we
forward SIGINT and SIGUSR1 to SIGTERM so every stop takes that synchronized path. Where
the sync service is unavailable (JAX was used before the runtime started), a plain
handler sets a flag that the loop reads after the current step.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Callable

from jax._src import distributed as jax_distributed

FORWARDED = (signal.SIGINT, signal.SIGUSR1)


class StopRequest:
  """Installs the handlers; `should_stop(step)` answers the same on every host."""

  def __init__(self, reached_preemption: Callable[[int], bool]):
    self._reached_preemption = reached_preemption
    self._flag = threading.Event()
    self.signal_name = None
    self._synced = jax_distributed.global_state.preemption_sync_manager is not None
    self._previous = {}
    handled = FORWARDED if self._synced else FORWARDED + (signal.SIGTERM,)
    for sig in handled:
      self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame) -> None:
    del frame
    self.signal_name = signal.Signals(signum).name
    if self._synced:
      # JAX's notifier listens for SIGTERM only; it then agrees a stop step with peers.
      os.kill(os.getpid(), signal.SIGTERM)
    else:
      self._flag.set()

  def should_stop(self, step: int) -> bool:
    if self._synced:
      return self._reached_preemption(step)
    return self._flag.is_set()

  def restore(self) -> None:
    """Puts the previous handlers back (tests run several loops in one process)."""
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
