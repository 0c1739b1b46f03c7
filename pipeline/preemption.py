"""Stop signals: turn SIGTERM, SIGINT and SLURM's USR1 into "save at a step, then exit".

With several processes, every host must stop at the same step, so the stop goes through
JAX's preemption sync manager (installed by `jax.distributed.initialize`): it owns
SIGTERM, spreads a notice to every host, and `reached_preemption_sync_point(step)` turns
true on every host at the same step: the largest step any host had passed when the
notice came, plus one. SIGINT and SIGUSR1 are forwarded to SIGTERM to take that path
too. A lone process needs no agreement, so it handles all three itself and stops after
the current step (the sync service would only add a second or so of latency); it still
polls the sync manager for preemption notices that do not come as signals, and acts on
a signal at once where a step boundary is far (`requested`: between eval batches, in
start-up).

The sync point is counted in train steps because Orbax's CheckpointManager.save also
asks the sync manager, with the step it saves: counters of our own (say, one per eval
batch) would mix with Orbax's, and a notice that came during a save would set a sync
point already passed, so the run would never stop. So with several processes a stop
lands at a step boundary, after the eval of that step if there is one.
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
  """Installs the handlers; `should_stop(step)` answers the same on every host."""

  def __init__(self):
    self._flag = threading.Event()
    self.signal_name = None
    self._synced = jax_distributed.global_state.preemption_sync_manager is not None
    self._forward = self._synced and jax.process_count() > 1
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

  @property
  def received(self) -> bool:
    """Whether this process was asked to stop by a signal it handles itself."""
    return self._flag.is_set()

  @property
  def reason(self) -> str:
    """The signal this process got, or 'preemption notice' (JAX's, from any host)."""
    return self.signal_name or 'preemption notice'

  def should_stop(self, step: int) -> bool:
    """Whether to save at `step` and exit. Called after every step on every host: the
    sync point needs each host's step."""
    if self._flag.is_set():
      return True
    return self._synced and multihost_utils.reached_preemption_sync_point(step)

  def requested(self) -> bool:
    """Whether this process was asked to stop and may act on it alone, now (between
    eval batches, during start-up): a lone process only. With several, the stop must
    come at a step all agree on (`should_stop`), so this stays False."""
    return self._flag.is_set()

  def restore(self) -> None:
    """Puts the previous handlers back (tests run several loops in one process)."""
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
