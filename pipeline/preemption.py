"""Stop signals: turn SIGTERM, SIGINT and SLURM's USR1 into "save at a step, then exit".

With several processes, every host must stop at the same point, so the stop goes through
JAX's preemption sync manager (installed by `jax.distributed.initialize`): it owns
SIGTERM, spreads a notice to every host, and each host's next
`reached_preemption_sync_point(n)` calls agree on one sync point, the largest `n` any
host had passed plus one. SIGINT and SIGUSR1 are forwarded to SIGTERM to take that path
too. A lone process needs no agreement, so it handles all three itself and stops after
the current step (the sync service would only add a second or so of latency); it still
polls the sync manager for preemption notices that do not come as signals.

The `n` passed is not the train step but a count of this object's checks: every host
makes the same checks in the same order (one per step, one between eval batches, a few
in start-up), so a stop can land between eval batches or in start-up too, on every host
at the same check, and an ImageNet eval need not finish inside a 30 s notice.
"""

from __future__ import annotations

import os
import signal
import threading

import jax
from jax._src import distributed as jax_distributed
from jax.experimental import multihost_utils

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopRequest:
  """Installs the handlers; `should_stop` and `requested` answer the same on every host
  when every host calls them in the same order."""

  def __init__(self):
    self._flag = threading.Event()
    self.signal_name = None
    self._synced = jax_distributed.global_state.preemption_sync_manager is not None
    self._forward = self._synced and jax.process_count() > 1
    self._checks = 0  # The sync manager's counter: the same sequence on every host.
    handled = STOP_SIGNALS[1:] if self._forward else STOP_SIGNALS
    self._previous = {sig: signal.signal(sig, self._handle) for sig in handled}

  def _handle(self, signum, frame) -> None:
    del frame
    self.signal_name = signal.Signals(signum).name
    if self._forward:
      # JAX's notifier listens for SIGTERM only; it then agrees a stop point with peers.
      os.kill(os.getpid(), signal.SIGTERM)
    else:
      self._flag.set()

  def _reached_sync_point(self) -> bool:
    if not self._synced:
      return False
    self._checks += 1
    return multihost_utils.reached_preemption_sync_point(self._checks)

  @property
  def received(self) -> bool:
    """Whether a stop has been requested (never checks with the other hosts)."""
    return self._flag.is_set()

  @property
  def reason(self) -> str:
    """The signal this process got, or 'preemption notice' (JAX's, from any host)."""
    return self.signal_name or 'preemption notice'

  def should_stop(self, step: int) -> bool:
    """Whether to save at `step` and exit. Called after every step on every host."""
    del step  # The checks are counted instead (see the module docstring).
    return self.requested()

  def requested(self) -> bool:
    """Whether to stop now, between steps (between eval batches, during start-up).

    Once it has been true, `should_stop` and `requested` stay true: the run is stopping.
    """
    if self._flag.is_set():
      return True
    if self._reached_sync_point():
      self._flag.set()  # The sync point passes; what was agreed stays agreed.
      return True
    return False

  def restore(self) -> None:
    """Puts the previous handlers back (tests run several loops in one process)."""
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
