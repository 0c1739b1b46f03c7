"""Metric writers: CLU's (TensorBoard event files + log lines) and a metrics.jsonl file;
the HParams dashboard's session file.

Only the lead process writes files; the others log, so a multi-host run has one set of
event files and one metrics.jsonl.

metrics.jsonl in a bucket (gs:// workdir): an object cannot be appended to, so the writer
keeps every record (those of earlier attempts, read back when it opens, and its own) and
rewrites the whole object: on flush and close, and after a write once `upload_every_s`
has passed since the last upload. The file is a few hundred bytes per logged step, and a
preempted run flushes before it exits; a crash loses at most the last interval's records
from the bucket (never the checkpoints). A local file is appended to and flushed per
write, as always.
"""

from __future__ import annotations

import json
import time
from typing import Any, Mapping

from clu import metric_writers
import numpy as np
import tensorflow as tf

from pipeline import storage


class JsonlWriter(metric_writers.MetricWriter):
  """One JSON line per write_scalars call: {"step": N, "train/loss": ...}.

  Appended to a local file; rewritten whole in a bucket (see the module docstring).
  """

  def __init__(self, path: str, upload_every_s: float = 10.0, now=time.monotonic):
    self._path, self._now = path, now
    self._file, self._lines, self._dirty = None, [], False
    if storage.is_local(path):
      self._file = open(path, 'a', encoding='utf-8')
    else:
      self._upload_every_s, self._uploaded_at = upload_every_s, now()
      if storage.exists(path):  # A resumed run keeps the records of earlier attempts.
        self._lines = storage.read_text(path).splitlines(keepends=True)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    self.write_record(
        {'step': int(step), **{k: float(np.asarray(v)) for k, v in scalars.items()}})

  def write_record(self, record: Mapping[str, Any]) -> None:
    """One JSON line of any JSON values (the data ledger's records carry strings)."""
    line = json.dumps(record) + '\n'
    if self._file is not None:
      self._file.write(line)
      self._file.flush()  # Readers (tests, dashboards) follow the file while training runs.
      return
    self._lines.append(line)
    self._dirty = True
    if self._now() - self._uploaded_at >= self._upload_every_s:
      self.flush()

  def write_summaries(self, step, values, metadata=None):
    pass  # Images, texts and the rest live in the TensorBoard event files only.

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self) -> None:
    if self._file is not None:
      self._file.flush()
    elif self._dirty:
      storage.write_text(self._path, ''.join(self._lines))
      self._dirty, self._uploaded_at = False, self._now()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    else:
      self.flush()


METRICS_FILE = 'metrics.jsonl'


def make_writer(workdir: str, *, lead: bool) -> metric_writers.MetricWriter:
  if not lead:
    return metric_writers.create_default_writer(just_logging=True)
  storage.make_dirs(workdir)
  return metric_writers.MultiWriter([
      metric_writers.create_default_writer(workdir),  # TensorFlow's writer: gs:// too.
      JsonlWriter(storage.join(workdir, METRICS_FILE)),
  ])


# The HParams dashboard's summaries have an event file of their own (see write_session).
SESSION_EVENTS_SUFFIX = '.hparams'


def write_session(workdir: str, values: Mapping[str, np.ndarray],
                  metadata: Mapping[str, bytes]) -> None:
  """Writes the HParams dashboard's summaries (`summaries.hparams_session`) to an event
  file of their own in `workdir`, then deletes an earlier attempt's.

  TensorBoard keeps the first metadata it reads for a tag of a run, and these summaries
  are all metadata: written beside the earlier ones, a resumed run would show the
  config, metrics and status its first attempt ended with. One file, the latest, holds
  them. TensorFlow's file system writes and deletes it, gs:// included, as it does the
  scalars' event files.
  """
  pattern = storage.join(workdir, f'events.out.tfevents.*{SESSION_EVENTS_SUFFIX}')
  earlier = tf.io.gfile.glob(pattern)
  writer = tf.summary.create_file_writer(workdir, filename_suffix=SESSION_EVENTS_SUFFIX)
  with writer.as_default():
    for tag, value in values.items():
      tf.summary.write(tag, value, step=0, metadata=metadata[tag])
  writer.close()
  for path in earlier:  # Only once the new file is complete: a crash never leaves none.
    tf.io.gfile.remove(path)


def has_jsonl(workdir: str) -> bool:
  return storage.exists(storage.join(workdir, METRICS_FILE))


def read_jsonl(workdir: str) -> list[dict[str, float]]:
  """All records of metrics.jsonl, for tests and plots."""
  text = storage.read_text(storage.join(workdir, METRICS_FILE))
  return [json.loads(line) for line in text.splitlines() if line.strip()]
