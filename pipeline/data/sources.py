"""Datasets by name: `config.data.name` -> the source class that reads it.

Each kind of source is one module of this package (`fashion_mnist`, `image_folder`, ...)
whose class subclasses `source.Source`; adding a dataset is that module and one line in
SOURCES. A source reads and checks what it can cheaply at construction, so a bad setting
or file stops the run before training with a message naming it.
"""

from __future__ import annotations

from typing import Any, Callable

from pipeline.data import csv_text
from pipeline.data import fashion_mnist
from pipeline.data import image_folder
from pipeline.data import rotten_tomatoes
from pipeline.data import synthetic
from pipeline.data import tfds_source
from pipeline.data.source import Run
from pipeline.data.source import Source

SOURCES: dict[str, Callable[[Any, Run], Source]] = {
    'fashion_mnist': fashion_mnist.FashionMnist,
    'rotten_tomatoes': rotten_tomatoes.RottenTomatoes,
    'image_folder': image_folder.ImageFolder,
    'csv_text': csv_text.CsvText,
    'tfds': tfds_source.Tfds,
    'synthetic': synthetic.Synthetic,
}

# Kept under their old names here: tests and benchmarks read the Fashion-MNIST and Rotten
# Tomatoes files themselves through these.
FASHION_MNIST_FILES = fashion_mnist.FASHION_MNIST_FILES
FASHION_MNIST_LABELS = fashion_mnist.FASHION_MNIST_LABELS
ROTTEN_TOMATOES_FILE = rotten_tomatoes.ROTTEN_TOMATOES_FILE
read_idx = fashion_mnist.read_idx


def make_source(config, run: Run = Run()) -> Source:
  """Builds, reads and checks the source named by `config.data.name`."""
  if config.data.name not in SOURCES:
    raise ValueError(f'config.data.name={config.data.name!r} is invalid: allowed values are '
                     f'{", ".join(SOURCES)}.')
  return SOURCES[config.data.name](config, run)
