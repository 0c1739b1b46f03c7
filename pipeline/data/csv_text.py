"""A CSV file with a text and a label column."""

from __future__ import annotations

import csv

import numpy as np

from pipeline.data.errors import DataError
from pipeline.data.source import choose_splits
from pipeline.data.source import Run
from pipeline.data.source import Source
from pipeline.data.source import split_texts
from pipeline.data.source import TextSplit


class CsvText(Source):
  """A CSV with a text and a label column (the book's IMDB CSV: review, sentiment).

  Label strings become ids in the order of `data.label_names`, else sorted. Without
  `data.eval_path` the file is split (stratified, seeded) into train/validation/test.
  """

  def __init__(self, config, run: Run):
    del run  # Reads nothing it would keep.
    super().__init__()
    d = config.data
    self.kind = 'text'
    self.origin = d.path
    texts, label_strings = self._read(config, d.path)
    self.label_names = tuple(d.label_names) or tuple(sorted({s for _, s in label_strings}))
    texts, labels = self._ids(config, d.path, texts, label_strings)
    if d.eval_path:
      eval_texts, eval_labels = self._ids(config, d.eval_path, *self._read(config, d.eval_path))
      self.splits = {'train': TextSplit(texts, labels),
                     'test': TextSplit(eval_texts, eval_labels)}
    else:
      self.splits = split_texts(config, texts, labels)
    self.train_split, self.eval_split = choose_splits(config, self.splits)

  def _read(self, config, path: str) -> tuple[list[str], list[tuple[int, str]]]:
    d = config.data
    texts, label_strings = [], []
    try:
      with open(path, encoding='utf-8', newline='') as f:
        for line, row in csv_rows(f, path, (d.text_column, d.label_column)):
          missing = [c for c in (d.text_column, d.label_column) if not row[c]]
          if missing:
            self._bad(config, f'{path}, line {line}: missing {" and ".join(missing)}')
            continue
          texts.append(row[d.text_column])
          label_strings.append((line, row[d.label_column].strip()))
    except OSError as e:
      raise DataError(f'{path}: cannot read ({e})') from None
    return texts, label_strings

  def _ids(self, config, path, texts, label_strings) -> tuple[list[str], np.ndarray]:
    ids = {name: i for i, name in enumerate(self.label_names)}
    kept_texts, labels = [], []
    for text, (line, label) in zip(texts, label_strings):
      if label not in ids:
        self._bad(config, f'{path}, line {line}: unknown label {label!r} (known: '
                          f'{", ".join(self.label_names)})')
        continue
      kept_texts.append(text)
      labels.append(ids[label])
    return kept_texts, np.array(labels, np.int32)


def csv_rows(f, path: str, columns: tuple[str, ...]):
  """Yields (line number, row dict) and names the file and line on any parse problem."""
  reader = csv.DictReader(f)
  try:
    header = reader.fieldnames or []
    for column in columns:
      if column not in header:
        raise DataError(f'{path}: no column {column!r} in the header (columns: '
                        f'{", ".join(header) or "none"})')
    for row in reader:
      # DictReader fills the fields a short row lacks with None; blank counts as missing.
      yield reader.line_num, {c: row[c] if row[c] and row[c].strip() else '' for c in columns}
  except csv.Error as e:
    raise DataError(f'{path}, line {reader.line_num}: {e}') from None
  except UnicodeDecodeError as e:
    raise DataError(f'{path}, near line {reader.line_num}: not UTF-8 text ({e})') from None
