"""The data ledger: which examples each train step consumed, in WORKDIR/ledger.jsonl.

One line per step, {"step": s, "digest": D}, D a 64-bit BLAKE2b digest of the train-split
indices of the step's global batch in batch order, and one line per finished epoch,
{"step": s, "epoch": e, "distinct": n, "examples": m}: the distinct examples and the
stream positions of epoch e, written at the step s that finished it (both equal the train
split's size when every example was seen exactly once). Comparing two runs' ledgers
shows whether they trained on the same examples in the same order.

Derived, not gathered. The lead needs every process's share of a step, and the data order
is a pure function of (seed, stream position) (pipeline/data/pipeline.py), so it computes
the global indices of the step itself: no communication in the step. What makes that
exact rather than assumed: every train batch carries its examples' indices ('index'), and
on every process `record(step)` checks that the batch the loop trained at `step` holds
that process's block of the derived indices; a mismatch (an iterator resumed at the wrong
step, batches out of order) stops the run naming the step and the process.

Resume. The lead rewrites the file at the start without the records of steps past the
restored checkpoint (steps that are trained again), so the ledger of an interrupted and
resumed run, on any process count, equals the uninterrupted run's. The file is written by
`reporting.JsonlWriter`: appended to locally, rewritten whole in a bucket.
"""

from __future__ import annotations

import collections
import hashlib
import json
from typing import Any, Callable

from absl import logging
import numpy as np

from pipeline import reporting
from pipeline import storage

LEDGER_FILE = 'ledger.jsonl'
# A bucket object is rewritten whole (reporting.JsonlWriter); the ledger grows by ~40 bytes
# a step, so it is uploaded less often than the metrics. A crash loses at most this much
# of it from the bucket, and the resumed run rewrites those steps anyway.
_UPLOAD_EVERY_S = 60.0


def digest(indices: np.ndarray) -> str:
  """The ledger's digest of a global batch's example indices (in batch order)."""
  data = np.ascontiguousarray(indices, dtype='<i8').tobytes()
  return hashlib.blake2b(data, digest_size=8).hexdigest()


def read(workdir: str) -> list[dict[str, Any]]:
  """The records of WORKDIR/ledger.jsonl (empty when there is none)."""
  path = storage.join(workdir, LEDGER_FILE)
  if not storage.exists(path):
    return []
  return _parse(path, storage.read_text(path))


def _parse(path: str, text: str) -> list[dict[str, Any]]:
  lines = [line for line in text.splitlines() if line.strip()]
  records = []
  for i, line in enumerate(lines):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      if i + 1 < len(lines):
        raise ValueError(f'{path}: line {i + 1} is not JSON: {line[:80]!r}') from None
      # A run killed mid-write leaves a torn last line; it is of a step past every
      # checkpoint (a step's line is complete before its save starts), so redone anyway.
      logging.warning('%s: dropping the torn last line %r.', path, line[:80])
  return records


class Ledger:
  """Checks every process's train batches against the data order; the lead records them.

  Use: `put = ledger.device_put(put)` for the batches on their way to the devices, then
  `record(step)` after each train step, in step order, and `close()` at the end.
  """

  def __init__(self, data, workdir: str, start_step: int, *, global_batch_size: int,
               process_index: int, process_count: int):
    """`start_step`: the restored step (0 for a fresh run); the next step is start_step + 1."""
    self._data, self._global_batch = data, global_batch_size
    self._block = slice(process_index * global_batch_size // process_count,
                        (process_index + 1) * global_batch_size // process_count)
    self._process_index = process_index
    # The 'index' fields of the batches sent to the devices, in order; appended by the
    # prefetch thread, consumed by `record` in the loop's thread (deque ops are atomic).
    self._pending: collections.deque[np.ndarray] = collections.deque()
    self._writer = None
    if process_index == 0:
      path = storage.join(workdir, LEDGER_FILE)
      storage.make_dirs(workdir)
      _drop_steps_after(path, start_step)
      self._writer = reporting.JsonlWriter(path, upload_every_s=_UPLOAD_EVERY_S)
      self._start_epoch(start_step)

  def _start_epoch(self, start_step: int) -> None:
    """Marks the examples the current epoch consumed before `start_step` (on resume)."""
    size = self._data.train_size
    first = start_step * self._global_batch
    self._epoch = first // size
    self._seen = np.zeros(size, bool)
    before = np.arange(self._epoch * size, first, dtype=np.int64)
    self._seen[self._data.train_indices(before)] = True
    self._examples = before.size

  def device_put(self, put: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """`put` for train batches: their 'index' stays on the host for `record`."""
    def put_batch(batch: dict[str, np.ndarray]) -> Any:
      batch = dict(batch)
      # One row per step: a call of several steps stacks their batches.
      self._pending.extend(np.atleast_2d(batch.pop('index')))
      return put(batch)
    return put_batch

  def record(self, step: int) -> None:
    """Checks the batch trained at loop step `step` (updates done after it), records it.

    Raises:
      RuntimeError: the batch does not hold the examples the data order gives the step.
    """
    if not self._pending:
      raise RuntimeError(f'Data ledger: no batch indices queued for step {step}; train '
                         'batches must go to the devices through Ledger.device_put.')
    got = self._pending.popleft()
    positions = np.arange((step - 1) * self._global_batch, step * self._global_batch,
                          dtype=np.int64)
    if self._writer is None:
      positions = positions[self._block]
    indices = self._data.train_indices(positions)
    mine = indices if self._writer is None else indices[self._block]
    if not np.array_equal(got, mine):
      raise RuntimeError(
          f'Data ledger: the batch trained at step {step} on process {self._process_index} '
          f'holds examples {got[:4].tolist()}..., but the data order (seed, step) gives '
          f'{mine[:4].tolist()}...; the input stream is not at the step the loop trains.')
    if self._writer is None:
      return
    self._writer.write_record({'step': step, 'digest': digest(indices)})
    self._count_epochs(step, positions, indices)

  def _count_epochs(self, step: int, positions: np.ndarray, indices: np.ndarray) -> None:
    size = self._data.train_size
    while positions.size:
      end = (self._epoch + 1) * size
      inside = positions < end
      self._seen[indices[inside]] = True
      self._examples += int(inside.sum())
      if positions[-1] + 1 < end:
        return
      self._writer.write_record({'step': step, 'epoch': self._epoch,
                                 'distinct': int(self._seen.sum()),
                                 'examples': self._examples})
      self._epoch, self._examples = self._epoch + 1, 0
      self._seen[:] = False
      positions, indices = positions[~inside], indices[~inside]

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


def _drop_steps_after(path: str, step: int) -> None:
  """Rewrites the ledger without the records of steps after `step` (trained again now)."""
  if not storage.exists(path):
    return
  text = storage.read_text(path)
  records = _parse(path, text)
  kept = [r for r in records if r['step'] <= step]
  if len(kept) != len(records) or not text.endswith('\n'):
    storage.write_text(path, ''.join(json.dumps(r) + '\n' for r in kept))
