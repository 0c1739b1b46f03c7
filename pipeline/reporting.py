"""Metric writers: CLU's (TensorBoard event files + log lines) and a metrics.jsonl file.

Only the lead process writes files; the others log, so a multi-host run has one set of
event files and one metrics.jsonl.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

from clu import metric_writers
import numpy as np


class JsonlWriter(metric_writers.MetricWriter):
  """Appends one JSON line per write_scalars call: {"step": N, "train/loss": ...}."""

  def __init__(self, path: str):
    self._file = open(path, 'a', encoding='utf-8')

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    record = {'step': int(step), **{k: float(np.asarray(v)) for k, v in scalars.items()}}
    self._file.write(json.dumps(record) + '\n')
    self._file.flush()  # Readers (tests, dashboards) follow the file while training runs.

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
    self._file.flush()

  def close(self) -> None:
    self._file.close()


def make_writer(workdir: str, *, lead: bool) -> metric_writers.MetricWriter:
  if not lead:
    return metric_writers.create_default_writer(just_logging=True)
  os.makedirs(workdir, exist_ok=True)
  return metric_writers.MultiWriter([
      metric_writers.create_default_writer(workdir),
      JsonlWriter(os.path.join(workdir, 'metrics.jsonl')),
  ])


def read_jsonl(workdir: str) -> list[dict[str, float]]:
  """All records of metrics.jsonl, for tests and plots."""
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]
