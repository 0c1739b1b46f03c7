"""Stop signals: turn SIGTERM, SIGINT and SLURM's USR1 into "save at a step, then exit".

With several processes, every host must stop at the same step, so the stop goes through
JAX's preemption sync manager (installed by `jax.distributed.initialize`): it owns
SIGTERM, and `CheckpointManager.reached_preemption(step)` turns true on every host at the
same step. SIGINT and SIGUSR1 are forwarded to SIGTERM to take that path too. A lone
process needs no agreement, so it handles all three itself and stops after the current
step (the sync service would only add a second or so of latency); it still polls the
sync manager for preemption notices that do not come as signals, and acts on a signal
at once where a step boundary is far (`requested`: between eval batches, in start-up).
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Callable

import jax
from jax._src import distributed as jax_distributed

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopRequest:
  """Installs the handlers; `should_stop(step)` answers the same on every host."""

  def __init__(self, reached_preemption: Callable[[int], bool]):
    self._reached_preemption = reached_preemption
    self._flag = threading.Event()
    self.signal_name = None
    synced = jax_distributed.global_state.preemption_sync_manager is not None
    self._forward = synced and jax.process_count() > 1
    # Whether `requested` can ever turn true: a lone process acts on a signal by itself.
    self.acts_alone = not self._forward
    handled = STOP_SIGNALS[1:] if self._forward else STOP_SIGNALS
    self._previous = {sig: signal.signal(sig, self._handle) for sig in handled}

  def _handle(self, signum, frame) -> None:
    del frame
    self.signal_name = signal.Signals(signum).name
    if self._forward:
      # JAX's notifier listens for SIGTERM only; it then agrees a stop step with peers.
      os.kill(os.getpid(), signal.SIGTERM)
    else:
      self._flag.set()

  def should_stop(self, step: int) -> bool:
    # Called every step on every host: the sync point needs each host's step.
    return self._reached_preemption(step) or self._flag.is_set()

  def requested(self) -> bool:
    """Whether this process was asked to stop and may act on it alone, now (between
    eval batches, during start-up): a lone process only. With several, the stop must
    come at a step all agree on (`should_stop`), so this stays False."""
    return self._flag.is_set()

  def restore(self) -> None:
    """Puts the previous handlers back (tests run several loops in one process)."""
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
