"""Stall watchdog: a process that makes no progress for `watchdog.timeout_s` exits.

A host that is alive but stuck (a read on a hung network file system, a deadlocked
thread, a collective waiting for a peer that is itself stuck) never crashes and keeps
sending heartbeats, so neither the exception hook nor the coordination service stops it:
every process would wait forever. The loop reports progress (`progress(phase, step)`:
start-up, each data fetch and train step, each eval batch, each checkpoint phase); a
daemon thread that sees none for `timeout_s` logs which phase and step stalled, dumps the
stack of every thread, and exits with `EXIT_CODE` through `os._exit` (the main thread is
the one that is stuck, so nothing else could run an orderly exit). The other processes
then lose its heartbeat and stop within `--heartbeat_timeout_s`, naming it.

A thread stuck in C code that holds the GIL would freeze this thread too; for that case
the stall thread keeps `faulthandler`'s own C-level timer armed a little beyond
`timeout_s`, which dumps the stacks (under 'Timeout (H:MM:SS)!', without the phase) and
exits with status 1 without needing the GIL.

With several processes, each publishes its last phase and step to the coordinator's
key-value store every 2 s (off the training thread), so the stall report names
the peers that have stopped progressing as well.
"""

from __future__ import annotations

import faulthandler
import itertools
import os
import sys
import threading
import time
from typing import Any, Iterable, Iterator

from absl import logging

from pipeline import exits

# Distinct from a crash (1) and an abort (134), so a scheduler or a retry loop can tell a
# stall, which a restart usually cures, from a bug, which it does not (exits.py's table).
EXIT_CODE = exits.STALLED
# Prefix of this module's keys in the coordinator's key-value store.
_KV_PREFIX = 'pipeline_watchdog'
# The most the stall thread sleeps between checks.
_MAX_POLL_S = 5.0
# How often each process publishes its progress: one small RPC to the coordinator, off
# the training thread; often enough that a stall report's steps are near the truth.
_PUBLISH_S = 2.0
# faulthandler's fallback timer fires this long (or timeout_s, if shorter) after the
# stall thread should have: room for a stall thread merely slowed by a busy GIL.
_FALLBACK_MARGIN_S = 30.0


def _stderr_fd() -> int:
  """A file descriptor for the stack dump: stderr, even when a test captured sys.stderr."""
  for stream in (sys.stderr, sys.__stderr__):
    try:
      return stream.fileno()
    except (AttributeError, OSError, ValueError):
      continue
  return 2


class Watchdog:
  """Exits the process when `progress` has not been called for `timeout_s` seconds.

  `timeout_s=0` turns it off: `progress` still works (it costs one tuple store) and
  `start` starts nothing. Use as a context manager, or `start()` then `close()`.
  """

  def __init__(self, timeout_s: float):
    if timeout_s < 0:
      raise ValueError(f'watchdog timeout_s={timeout_s!r} is invalid: must be >= 0 '
                       '(0 = off).')
    self.timeout_s = float(timeout_s)
    # (monotonic time, phase, step, eval batch or None) of the last progress.
    self._last = (time.monotonic(), 'startup', 0, None)
    self._done = threading.Event()
    self._threads: list[threading.Thread] = []
    self._fallback_armed = False

  @classmethod
  def from_config(cls, config) -> Watchdog:
    return cls(config.watchdog.timeout_s)

  def progress(self, phase: str, step: int, batch: int | None = None) -> None:
    """Marks progress in `phase` ('data', 'train', 'eval', 'checkpoint', ...) at `step`.

    Called on every step from the training thread: one tuple assignment, which the
    GIL makes atomic, so the stall thread reads a consistent record without a lock.
    """
    self._last = (time.monotonic(), phase, step, batch)

  @property
  def step(self) -> int:
    """The step of the last `progress` call."""
    return self._last[2]

  def watch(self, items: Iterable[Any], phase: str) -> Iterator[Any]:
    """Yields `items`, marking progress in `phase` before each is fetched, with the
    step of the last `progress` call and the item's index (e.g. an eval pass)."""
    step, iterator = self._last[2], iter(items)
    for index in itertools.count():
      self.progress(phase, step, index)
      try:
        item = next(iterator)
      except StopIteration:
        return
      yield item

  def start(self) -> Watchdog:
    if self.timeout_s <= 0 or self._threads:
      return self
    publish = _distributed_client() is not None  # Imports jax: before the clock starts.
    self._last = (time.monotonic(),) + self._last[1:]
    self._threads = [threading.Thread(target=self._check_loop, name='watchdog', daemon=True)]
    if publish:
      self._threads.append(threading.Thread(target=self._publish_loop,
                                            name='watchdog_publish', daemon=True))
    for thread in self._threads:
      thread.start()
    return self

  def close(self) -> None:
    """Stops the threads; the process may now take as long as it likes."""
    self._done.set()
    for thread in self._threads:
      thread.join()
    self._threads = []
    if self._fallback_armed:
      faulthandler.cancel_dump_traceback_later()
      self._fallback_armed = False

  def __enter__(self) -> Watchdog:
    return self.start()

  def __exit__(self, *exc_info) -> None:
    self.close()

  @property
  def _poll_s(self) -> float:
    return min(_MAX_POLL_S, max(0.05, self.timeout_s / 10))

  def _check_loop(self) -> None:
    while not self._done.wait(self._poll_s):
      since, phase, step, batch = self._last
      idle = time.monotonic() - since
      if idle > self.timeout_s:
        self._fire(idle, phase, step, batch)
      # Re-armed on every check, so it only fires if this thread stops checking.
      faulthandler.dump_traceback_later(
          self.timeout_s - idle + self._poll_s + min(_FALLBACK_MARGIN_S, self.timeout_s),
          exit=True,
          file=_stderr_fd())
      self._fallback_armed = True

  def _fire(self, idle: float, phase: str, step: int, batch: int | None) -> None:
    where = f'{phase} at step {step}' + (f', batch {batch}' if batch is not None else '')
    hint = (' (compiling: raise watchdog.timeout_s if it legitimately takes longer)'
            if phase == 'compile' else '')
    logging.error(
        'Watchdog: no progress for %.0f s (watchdog.timeout_s=%g) on process %d, stuck in '
        '%s%s. %sStacks of all threads follow; exiting with status %d so the job can be '
        'restarted.', idle, self.timeout_s, _process_id(), where, hint, _peers_line(),
        EXIT_CODE)
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    faulthandler.dump_traceback(file=_stderr_fd(), all_threads=True)
    os._exit(EXIT_CODE)  # pylint: disable=protected-access

  def _publish_loop(self) -> None:
    client, pid = _distributed_client(), _process_id()
    while not self._done.wait(_PUBLISH_S):
      since, phase, step, _ = self._last
      try:
        # Wall time, not monotonic: a peer reads it. Hosts' clocks are NTP-close.
        client.key_value_set(f'{_KV_PREFIX}/{pid}',
                             f'{phase} {step} {time.time() - (time.monotonic() - since):.1f}',
                             allow_overwrite=True)
      except Exception:  # pylint: disable=broad-except
        # The coordinator may be gone; the heartbeat reports that, not this thread.
        return


def _distributed_client() -> Any:
  """The jax.distributed client of a multi-process job, or None."""
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  state = distributed.global_state
  return state.client if state.client is not None and state.num_processes > 1 else None


def _process_id() -> int:
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  return distributed.global_state.process_id or 0


def _peers_line(timeout_s: float = 5.0) -> str:
  """'Last progress of the processes: 0 train step 12 (3 s ago), ...', or '' alone.

  Read in a helper thread bounded by `timeout_s`: a stuck coordinator must not keep the
  stalled process from exiting.
  """
  client = _distributed_client()
  if client is None:
    return ''
  found: list[tuple[str, str]] = []

  def read():
    found.extend(client.key_value_dir_get(_KV_PREFIX))

  reader = threading.Thread(target=read, daemon=True)
  reader.start()
  reader.join(timeout_s)
  if not found:
    return 'The last progress of the other processes could not be read. '
  now, parts = time.time(), []
  for key, value in sorted(found, key=lambda kv: int(kv[0].rsplit('/', 1)[1])):
    phase, step, at = value.split()
    parts.append(f'process {key.rsplit("/", 1)[1]}: {phase} step {step} '
                 f'({now - float(at):.0f} s ago)')
  return 'Last progress of the processes: ' + '; '.join(parts) + '. '
