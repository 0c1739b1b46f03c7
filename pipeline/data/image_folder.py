"""A directory of image files, labelled by class subfolder or by a file-name pattern."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import re
from typing import Sequence

from absl import logging
import numpy as np

from pipeline.data import images
from pipeline.data import run_files
from pipeline.data.errors import DataError
from pipeline.data.source import held_out_fractions
from pipeline.data.source import Run
from pipeline.data.source import Source
from pipeline.data.source import stratified_split

LISTING_FILE = 'image_folder_files.json.gz'
# Bad files in a row a training read steps over before it calls the folder broken.
MAX_SUBSTITUTES = 100


@dataclasses.dataclass
class FileSplit:
  """Image files, decoded (and resized) when a batch reads them.

  Nothing is opened until then, so a file that turns out unreadable is found when it is
  read: `read` raises naming it; `read_skipping` (data.on_bad_record='skip') leaves it out.
  """
  paths: tuple[str, ...]
  labels: np.ndarray
  size: tuple[int, int]  # (height, width) every image is brought to.
  channels: int
  resize: bool  # False (data.image_size=0): every image must already be `size`.
  size_file: str  # The image that fixed the native size, named in errors.
  skip_bad: bool  # data.on_bad_record == 'skip'.

  def __len__(self) -> int:
    return len(self.labels)

  @property
  def shape(self) -> tuple[int, ...]:
    return (*self.size, self.channels)

  def read(self, indices: np.ndarray,
           boxes: Sequence[images.BoxFn | None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [B, H, W, C] and labels; `boxes[i]` picks example i's crop."""
    boxes = boxes or [None] * len(indices)
    decoded = [self._decode(i, box) for i, box in zip(indices, boxes)]
    # One example (the per-example train path): a view, not a copy; grain's batch copies.
    inputs = decoded[0][None] if len(decoded) == 1 else np.stack(decoded)
    return inputs, self.labels[indices]

  def read_skipping(self, indices: np.ndarray, boxes: Sequence[images.BoxFn | None] | None = None,
                    *, substitute: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reads what it can; returns (inputs, labels, ok) with ok False where a file was bad.

    Args:
      indices: int [B] examples of this split.
      boxes: as for `read`; a substitute gets the crop of the slot it fills.
      substitute: fill a bad file's slot with the next readable file of the split
        (training, where a batch must stay full); else the slot is zeros (eval masks it).
    """
    boxes = boxes or [None] * len(indices)
    inputs = np.zeros((len(indices), *self.shape), np.uint8)
    labels = self.labels[indices].copy()
    ok = np.ones(len(indices), bool)
    for slot, index in enumerate(indices):
      image = self._try(index, boxes[slot])
      if image is None:
        ok[slot] = False
        if substitute:
          # The next readable file after it, a pure function of the index, so a resumed
          # run or another process count reads the same substitute.
          for step in range(1, min(len(self), MAX_SUBSTITUTES + 1)):
            other = (int(index) + step) % len(self)
            image = self._try(other, boxes[slot])
            if image is not None:
              labels[slot] = self.labels[other]
              break
          else:
            raise DataError(f'{self.paths[index]} and the {MAX_SUBSTITUTES} files after it '
                            'are unreadable; is the folder intact?')
      if image is not None:
        inputs[slot] = image
    return inputs, labels, ok

  def _try(self, index, box) -> np.ndarray | None:
    try:
      return self._decode(index, box)
    except DataError as e:
      logging.warning('Skipping bad record: %s', e)
      return None

  def _decode(self, index, box: images.BoxFn | None) -> np.ndarray:
    path = self.paths[index]
    image = images.decode(path, size=self.size if self.resize else None,
                          channels=self.channels, box=box)
    if image.shape[:2] != tuple(self.size):
      raise DataError(f'{path}: image is {image.shape[0]}x{image.shape[1]} but '
                      f'{self.size_file} is {self.size[0]}x{self.size[1]}; set '
                      'data.image_size to resize')
    return image


class ImageFolder(Source):
  """A directory of images; labels from class subfolders or from `data.label_pattern`.

  Class subfolders: `root/<label>/**/image.png`. Label pattern (the book's cats vs dogs,
  `cat.1.jpg`): every image under root whose file name the regex matches, group 1 = label.
  Eval is `data.eval_path` (split 'test') if set, else a seeded stratified
  `data.validation_fraction` of the folder (split 'validation').

  Start-up only lists the folders (once per run: process 0 writes the list to the workdir,
  see `run_files`); no file is opened but the first, whose size is the native size when
  data.image_size is 0.
  """

  def __init__(self, config, run: Run):
    super().__init__()
    with _no_cyclic_gc():
      self._build(config, run)

  def _build(self, config, run: Run) -> None:
    d = config.data
    self.kind = 'image'
    self.origin = d.path
    pattern = None
    if d.label_pattern:
      try:
        pattern = re.compile(d.label_pattern)
      except re.error as e:
        raise ValueError(f'config.data.label_pattern={d.label_pattern!r} is invalid: {e}.')
    roots = [d.path] + ([d.eval_path] if d.eval_path else [])
    listing = run_files.shared(
        run.workdir, LISTING_FILE, {'roots': roots, 'label_pattern': d.label_pattern},
        lambda: [_scan(root, pattern) for root in roots], process_index=run.process_index)
    # Reported only now, by every process alike, after process 0 has written the list.
    for root, (found, bad) in zip(roots, listing):
      for message in bad:
        self._bad(config, message)
      if not found:
        raise DataError(f'{root}: no images found (looked for '
                        f'{", ".join(images.EXTENSIONS)}'
                        + (', in class subfolders)' if pattern is None else ')'))
    train = listing[0][0]
    self.label_names = tuple(d.label_names) or tuple(sorted({label for _, label in train}))
    paths, labels = self._ids(config, d.path, train)
    if d.image_size:
      self._size, self._size_file = (d.image_size, d.image_size), ''
    else:
      self._size, self._size_file = images.probe(paths[0]), paths[0]
    if d.eval_path:
      eval_paths, eval_labels = self._ids(config, d.eval_path, listing[1][0])
      self.splits = {'train': self._split(config, paths, labels),
                     'test': self._split(config, eval_paths, eval_labels)}
      self.eval_split = 'test'
    else:
      parts = stratified_split(labels, held_out_fractions(config, test=False))
      self.splits = {name: self._split(config, [paths[i] for i in idx], labels[idx])
                     for name, idx in parts.items()}
      if 'validation' not in self.splits:
        raise ValueError('config.data.validation_fraction=0 is invalid for image_folder '
                         'without data.eval_path: nothing would be left to evaluate.')
      self.eval_split = 'validation'
    self.train_split = 'train'

  def _split(self, config, paths, labels) -> FileSplit:
    return FileSplit(tuple(paths), labels, self._size, config.data.channels,
                     resize=bool(config.data.image_size), size_file=self._size_file,
                     skip_bad=config.data.on_bad_record == 'skip')

  def _ids(self, config, root: str, found) -> tuple[list[str], np.ndarray]:
    ids = {name: i for i, name in enumerate(self.label_names)}
    paths, labels = [], []
    # Concatenated, not os.path.join per file: that was half of start-up's CPU time.
    prefix = os.path.join(root, '')
    for relative, label in found:
      path = prefix + relative
      if label not in ids:
        self._bad(config, f'{path}: unknown label {label!r} (known: '
                          f'{", ".join(self.label_names)})')
        continue
      paths.append(path)
      labels.append(ids[label])
    if not paths:
      raise DataError(f'{root}: no images with a known label')
    return paths, np.array(labels, np.int32)


@contextlib.contextmanager
def _no_cyclic_gc():
  """Pauses Python's cyclic garbage collector while the listing is built.

  A listing is a few objects per file, none in a reference cycle, but allocating them sets
  off full collections, each of which walks every object of the process (JAX's and
  TensorFlow's included): 80-100 ms each, a few us per file of 20k, at random points. That
  was the spread of start-up times between rounds (bench/input.py --imagenet).
  """
  enabled = gc.isenabled()
  gc.disable()
  try:
    yield
  finally:
    if enabled:
      gc.enable()


def _scan(root: str, pattern) -> tuple[list[tuple[str, str]], list[str]]:
  """Lists every image file under root, in sorted order, without opening any.

  Returns:
    ([(path relative to root, label string)], [a message per file that has no label]).
  """
  if not os.path.isdir(root):
    raise DataError(f'{root}: no such directory')
  found, bad = [], []
  for directory, subdirectories, files in os.walk(root):
    subdirectories.sort()  # os.walk descends in this order: the listing is sorted.
    relative_dir = os.path.relpath(directory, root)
    label = None if directory == root else relative_dir.split(os.sep)[0]
    prefix = '' if directory == root else relative_dir + os.sep  # See ImageFolder._ids.
    for name in sorted(files):
      if not name.lower().endswith(images.EXTENSIONS):
        continue
      relative = prefix + name
      if pattern is not None:
        match = pattern.search(name)
        if not match or match.lastindex is None:
          bad.append(f'{os.path.join(root, relative)}: file name does not match '
                     f'data.label_pattern {pattern.pattern!r} (group 1 = label)')
          continue
        found.append((relative, match.group(1)))
      elif label is None:
        bad.append(f'{os.path.join(root, relative)}: image outside a class subfolder (set '
                   'data.label_pattern to read labels from file names)')
      else:
        found.append((relative, label))
  return found, bad
