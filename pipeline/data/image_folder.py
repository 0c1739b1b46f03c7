"""A directory of image files, labelled by class subfolder or by a file-name pattern."""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np

from pipeline.data import images
from pipeline.data.errors import DataError
from pipeline.data.source import held_out_fractions
from pipeline.data.source import Source
from pipeline.data.source import stratified_split


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


class ImageFolder(Source):
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
      parts = stratified_split(labels, held_out_fractions(config, test=False))
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
