"""How a training run ends: its exit code, and what happens to a save already started.

Exit codes of `python -m pipeline.main` (the one table; `code_for` applies it):

  ====  ======================================================================
  code  meaning
  ====  ======================================================================
  0     finished, or stopped on request (signal, preemption notice, early
        stopping) with that step's checkpoint committed
  1     any other error (the traceback names it)
  3     NON_FINITE_LOSS: a non-finite training loss (FloatingPointError); no
        checkpoint of a non-finite state was written
  4     SAVE_LOST: a checkpoint save failed or did not commit (the log names
        the step and why); rerunning resumes from the newest committed step
  75    STALLED: no progress for config.watchdog.timeout_s (pipeline/watchdog.py;
        EX_TEMPFAIL of sysexits.h: restart the job); the log has every stack
  ====  ======================================================================

An exception in the loop first goes through `settle_after_error`: the save in flight is
given `checkpoint.exit_wait_s` to commit and the prefetch thread is stopped, before the
exception goes on to the process's exit (in a multi-process run, `os._exit` from the hook
of pipeline/multihost.py, which would otherwise kill the save's threads mid-write).
"""

from __future__ import annotations

import contextlib
import sys
import threading
import traceback
from typing import Any, Callable

from absl import logging

FINISHED = 0
ERROR = 1
NON_FINITE_LOSS = 3
SAVE_LOST = 4
STALLED = 75


def code_for(error: BaseException) -> int:
  """The exit code for a run that ended with `error` (the table above)."""
  if isinstance(error, FloatingPointError):
    return NON_FINITE_LOSS
  # Errors that know their code carry it (checkpoint.SaveError), so that this module
  # imports none of the modules whose errors it classifies.
  return getattr(error, 'exit_code', ERROR)


@contextlib.contextmanager
def exit_codes(process_count: int):
  """Turns an exception of the body into its exit code after printing it.

  Several processes: the exception goes on to multihost's hook, which exits with the
  same `code_for` at once (a normal exit would wait in JAX's shutdown barrier).
  """
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    code = code_for(e)
    if process_count > 1 or code == ERROR:
      raise
    traceback.print_exc()
    logging.error('Exiting with code %d (%s).', code, type(e).__name__)
    sys.exit(code)


def _bounded(fn: Callable[[], Any], timeout_s: float) -> tuple[bool, BaseException | None]:
  """Runs `fn` on a daemon thread for at most `timeout_s`: (finished, its error or None).

  A daemon thread, because what it waits for may never return (a dead peer in a
  multi-process commit, a hung file system read) and must not keep the process alive.
  """
  outcome: list[BaseException | None] = []

  def target():
    try:
      fn()
      outcome.append(None)
    except BaseException as e:  # pylint: disable=broad-except
      outcome.append(e)

  thread = threading.Thread(target=target, name='exit_wait', daemon=True)
  thread.start()
  thread.join(timeout_s)
  return (True, outcome[0]) if outcome else (False, None)


def settle_after_error(ckpt: Any, error: BaseException, timeout_s: float,
                       *closers: Callable[[], Any]) -> None:
  """Waits up to `timeout_s` for `ckpt`'s save in flight, logs whether it committed or
  was lost and why, then runs `closers` (e.g. closing the prefetch thread) for at most
  10 s each; never raises, so that `error` goes on."""
  step = ckpt.unchecked_step
  finished, save_error = _bounded(ckpt.wait_until_finished, timeout_s)
  why = f'exiting on {type(error).__name__}: {str(error)[:200]}'
  if step is None:
    pass  # No save since the last one that was checked: nothing can be lost.
  elif not finished:
    logging.error('Checkpoint step %d was LOST: not committed within checkpoint.'
                  'exit_wait_s=%g s (%s). A peer process may be dead or stuck. A rerun '
                  'resumes from the newest committed step.', step, timeout_s, why)
  elif save_error is not None:
    logging.error('Checkpoint step %d was LOST: its save failed (%s) while %s.', step,
                  save_error, why)
  else:
    logging.warning('Checkpoint step %d committed before %s.', step, why)
  for close in closers:
    # The prefetch thread may be stuck in a read; a daemon thread does not keep us alive.
    closed, close_error = _bounded(close, 10.0)
    if not closed or close_error is not None:
      logging.warning('%s did not finish on the way out (%s); exiting anyway.',
                      getattr(close, '__qualname__', close), close_error or 'still running')
  logging.flush()


@contextlib.contextmanager
def keep_started_save(ckpt: Any, timeout_s: float, *closers: Callable[[], Any]):
  """On an exception of the body, `settle_after_error` runs before it goes on."""
  try:
    yield
  except BaseException as e:
    settle_after_error(ckpt, e, timeout_s, *closers)
    raise
