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

  With data.synthetic_task='regression' the labels are instead the num_classes float
  targets of that projection itself, scaled to unit variance, plus Gaussian noise of
  standard deviation `REGRESSION_NOISE` (what no model can predict).
  """
  REGRESSION_NOISE = 0.1

  def __init__(self, config, run: Run):
    del run  # Reads nothing it would keep.
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
