"""Random inputs with learnable labels, for smoke tests."""

from __future__ import annotations

import numpy as np

from pipeline.data.source import ArraySplit
from pipeline.data.source import Run
from pipeline.data.source import Source
from pipeline.data.source import SPLIT_SEED


class Synthetic(Source):
  """Random float32 inputs whose labels a model can learn, for smoke tests.

  Label = argmax of a fixed random linear projection of the input, so a linear model can
  reach 100% and a falling loss is a real signal. Inputs are standard normal already,
  so they are used as they are (no normalization or augmentation).
  """

  def __init__(self, config, run: Run):
    del run  # Reads nothing it would keep.
    super().__init__()
    d = config.data
    self.kind = 'vector'
    self.origin = 'synthetic data'
    self.label_names = tuple(str(i) for i in range(d.num_classes))
    self.train_split, self.eval_split = 'train', 'test'
    shape = tuple(d.synthetic_shape)
    rng = np.random.default_rng(SPLIT_SEED)
    projection = rng.standard_normal((int(np.prod(shape)), d.num_classes), np.float32)
    self.splits = {}
    for split, size in (('train', d.synthetic_train_size), ('test', d.synthetic_eval_size)):
      inputs = rng.standard_normal((size, *shape), np.float32)
      labels = np.argmax(inputs.reshape(size, -1) @ projection, axis=1).astype(np.int32)
      self.splits[split] = ArraySplit(inputs, labels)
