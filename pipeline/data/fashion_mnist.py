"""Fashion-MNIST from the four IDX gzip files (Debian's dataset-fashion-mnist)."""

from __future__ import annotations

import gzip
import os
import struct
import zlib

import numpy as np

from pipeline.data import images
from pipeline.data.errors import DataError
from pipeline.data.source import ArraySplit
from pipeline.data.source import Run
from pipeline.data.source import Source

FASHION_MNIST_FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}
FASHION_MNIST_LABELS = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal',
                        'Shirt', 'Sneaker', 'Bag', 'Ankle boot')


class FashionMnist(Source):
  """Fashion-MNIST from the four IDX gzip files; eval is the 10k test split."""

  def __init__(self, config, run: Run):
    del run  # Reads nothing it would keep.
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
