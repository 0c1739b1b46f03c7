"""A TFDS dataset read by index through `tfds.data_source` (ArrayRecord, no TensorFlow)."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from pipeline.data import images
from pipeline.data.errors import DataError
from pipeline.data.source import Run
from pipeline.data.source import Source
from pipeline.data.source import TextSplit


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
  where: str  # Dataset and split, for errors.

  def __len__(self) -> int:
    return len(self.source)

  @property
  def shape(self) -> tuple[int, ...]:
    return (*self.size, self.channels)

  def read(self, indices: np.ndarray,
           boxes: Sequence[images.BoxFn | None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [B, H, W, C] and labels; `boxes[i]` picks example i's crop."""
    # Record by record: `__getitems__` is not served by tfds.testing.mock_data.
    records = [self.source[int(i)] for i in indices]
    labels = np.array([r['label'] for r in records], np.int32)
    if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
      bad = int(np.flatnonzero((labels < 0) | (labels >= self.num_classes))[0])
      raise DataError(f'{self.where}, record {indices[bad]}: label {labels[bad]} is outside '
                      f'0..{self.num_classes - 1}')
    boxes = boxes or [None] * len(records)
    # The records hold the encoded image (see Tfds): decoded here, cropped first.
    batch = [images.decode(_encoded(r['image']), size=self.size, channels=self.channels,
                           box=box, name=f'{self.where}, record {i}')
             for r, box, i in zip(records, boxes, indices)]
    return np.stack(batch), labels


def _encoded(value) -> bytes:
  # SkipDecoding hands over bytes, or a 0-d object array of them.
  return value.item() if isinstance(value, np.ndarray) else value


class Tfds(Source):
  """A TFDS dataset through `tfds.data_source` (ArrayRecord, random access, no TensorFlow).

  Image datasets need an 'image' feature; text datasets a 'text' feature (vectorized like
  the other text sources). Both need an integer 'label' ClassLabel.
  """

  def __init__(self, config, run: Run):
    del run  # Reads nothing it would keep.
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
        # Images are read as their encoded bytes and decoded here, with the crop, rather
        # than decoded whole by TFDS first.
        decoders = {'image': tfds.decode.SkipDecoding()} if self.kind == 'image' else None
        source = tfds.data_source(d.tfds_name, split=split, data_dir=data_dir,
                                  decoders=decoders)
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
    return TfdsSplit(source, len(self.label_names), size, d.channels, where)


def _as_str(value) -> str:
  if isinstance(value, np.ndarray):
    value = value.item()
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)
