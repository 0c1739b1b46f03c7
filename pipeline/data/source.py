"""What every source shares: the split containers, the base class, seeded splitting.

A source turns `config.data` into named splits with random access by index. The split
kinds every source may use live here (`ArraySplit` in memory, `TextSplit` raw strings the
pipeline vectorizes); a source with its own storage (image files, TFDS records) defines
its split class in its own module. Each source kind is one module of this package,
registered by name in `sources.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from absl import logging
import numpy as np

from pipeline.data.errors import DataError

# Fixed, not config.seed: held-out splits must not move when a run changes its seed,
# or a model would be compared on examples another seed trained on.
SPLIT_SEED = 20240917


@dataclasses.dataclass(frozen=True)
class Run:
  """Where a source runs: what it may keep in the workdir, and whether it is process 0."""
  workdir: str | None = None  # None: keep nothing (tests, benchmarks, predict inputs).
  process_index: int = 0


@dataclasses.dataclass
class ArraySplit:
  """A split held in memory."""
  inputs: np.ndarray  # uint8 images [N, H, W, C], int32 token ids or float32 vectors.
  labels: np.ndarray  # int32 [N].

  def __len__(self) -> int:
    return len(self.labels)

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.inputs.shape[1:])

  def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return self.inputs[indices], self.labels[indices]


@dataclasses.dataclass
class TextSplit:
  """Raw strings; the pipeline fits the vectorizer on the train split and converts."""
  texts: list[str]
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)


class Source:
  """Base of every source: what its constructor sets, and the bad-record policy."""
  kind: str  # 'image' (uint8 HWC), 'text' (strings) or 'vector' (float32, used as is).
  splits: dict[str, Any]
  train_split: str
  eval_split: str
  label_names: tuple[str, ...]
  origin: str  # The file, folder or dataset name that errors about the whole set name.

  def __init__(self):
    self.skipped: list[str] = []  # One message per record dropped under on_bad_record=skip.

  def _bad(self, config, message: str) -> None:
    if config.data.on_bad_record != 'skip':
      raise DataError(message)
    self.skipped.append(message)
    logging.warning('Skipping bad record: %s', message)


def stratified_split(labels: np.ndarray, fractions: dict[str, float],
                     seed: int = SPLIT_SEED) -> dict[str, np.ndarray]:
  """Seeded per-class split; returns sorted indices for 'train' and each held-out name.

  Args:
    labels: int [N].
    fractions: held-out split name -> share of each class, e.g. {'validation': 0.1}.
    seed: the split seed (SPLIT_SEED unless testing).
  """
  rng = np.random.default_rng(seed)
  parts = {name: [] for name in ('train', *fractions)}
  for label in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == label))
    start = 0
    for name, fraction in fractions.items():
      count = int(round(fraction * len(members)))
      parts[name].append(members[start:start + count])
      start += count
    parts['train'].append(members[start:])
  return {name: np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64)
          for name, p in parts.items()}


def held_out_fractions(config, *, test: bool) -> dict[str, float]:
  """The checked data.validation_fraction (and test_fraction) that are above zero."""
  d = config.data
  fractions = {'validation': d.validation_fraction}
  if test:
    fractions['test'] = d.test_fraction
  for name, value in fractions.items():
    if not 0 <= value < 1:
      raise ValueError(f'config.data.{name}_fraction={value!r} is invalid: must be in [0, 1).')
  if sum(fractions.values()) >= 1:
    raise ValueError(f'config.data.validation_fraction + test_fraction = '
                     f'{sum(fractions.values())} leaves no training data.')
  return {name: value for name, value in fractions.items() if value > 0}


def split_texts(config, texts: list[str], labels: np.ndarray) -> dict[str, TextSplit]:
  """Stratified train/validation/test splits of one text set."""
  parts = stratified_split(labels, held_out_fractions(config, test=True))
  return {name: TextSplit([texts[i] for i in idx], labels[idx]) for name, idx in parts.items()}


def choose_splits(config, splits: dict) -> tuple[str, str]:
  """data.train_split and data.eval_split, checked against the splits there are."""
  d = config.data
  for key in ('train_split', 'eval_split'):
    if d[key] not in splits:
      raise ValueError(f'config.data.{key}={d[key]!r} is invalid: {d.name} has splits '
                       f'{", ".join(splits)}.')
  return d.train_split, d.eval_split
