"""Facts about a dataset that one process works out once per run and keeps in the workdir.

Listing an image folder of a million files, or decoding a sample for channel statistics,
is start-up work that every process of every restart would otherwise repeat. Process 0
computes such a value once and writes it beside the checkpoints as gzip'd JSON; the other
processes, and every later start, read it back. Each file records the settings it was made
from (its key), so a run restarted on other data recomputes rather than reusing a stale one.
"""

from __future__ import annotations

import gzip
import json
import time
from typing import Any, Callable

from absl import logging

from pipeline import storage
from pipeline.data.errors import DataError

# How long the other processes wait for process 0's file: listing ImageNet on a network
# file system takes minutes, but a process 0 that died should not hang the rest for ever.
WAIT_SECONDS = 1800.0
_POLL_SECONDS = 0.2


def shared(workdir: str | None, name: str, key: dict[str, Any], compute: Callable[[], Any],
           *, process_index: int, wait_seconds: float = WAIT_SECONDS) -> Any:
  """The JSON value `compute()` returns, computed once per run by process 0.

  Args:
    workdir: the run's workdir; None computes here, every time (tests, benchmarks).
    name: file name in the workdir, e.g. 'image_folder_files.json.gz'.
    key: the settings the value depends on (JSON); a file with another key is recomputed.
    compute: makes the value (JSON-serializable) when the file is absent or stale.
    process_index: this process; only process 0 computes and writes.
    wait_seconds: how long other processes wait for process 0's file.

  Raises:
    DataError: process 0's file did not appear (or kept another key) within wait_seconds.
  """
  if workdir is None:
    return compute()
  path = storage.join(workdir, name)
  if process_index == 0:
    found = _read(path, key)
    if found is not None:
      return found['value']
    value = compute()
    storage.make_dirs(workdir)
    blob = json.dumps({'key': key, 'value': value}, separators=(',', ':')).encode()
    # Level 1: the list of a million paths compresses to about a fifth either way, and
    # level 9 would add seconds to every first start.
    storage.write_bytes(path, gzip.compress(blob, compresslevel=1))
    return value
  deadline = time.monotonic() + wait_seconds
  while True:
    found = _read(path, key)
    if found is not None:
      return found['value']
    if time.monotonic() > deadline:
      raise DataError(f'{path}: process 0 had not written it (for settings {key}) after '
                      f'{wait_seconds:.0f} s; is process 0 running and reading the same data?')
    time.sleep(_POLL_SECONDS)


def _read(path: str, key: dict[str, Any]) -> dict[str, Any] | None:
  if not storage.exists(path):
    return None
  try:
    found = json.loads(gzip.decompress(storage.read_bytes(path)))
  except (OSError, EOFError, ValueError) as e:
    # Writes are atomic, so this is damage from outside the run: recompute (process 0).
    logging.warning('%s: unreadable (%s); it will be rebuilt.', path, e)
    return None
  # Through JSON so that tuples and lists compare equal.
  if found.get('key') != json.loads(json.dumps(key)):
    return None
  return found
