"""Model registry: `make_model(config)` picks a Flax module by `config.model.name`.

Every model is called as `model.apply(variables, x, train=bool, rngs=...)` and returns
float32 logits [batch, num_classes]. Parameters are split into two top-level submodules so
that freezing and partial restores work by path prefix: 'backbone/...' is the feature
extractor and 'head/{kernel,bias}' is the classifier. Models with BatchNorm ('cnn_bn', the
ResNets) also carry a 'batch_stats' collection that is mutable when `train=True`; 'cnn_bn'
draws dropout from the 'dropout' rng. Adding a model is one file and one line below.

A name with a colon, 'package.module:Class', is a Linen or NNX model of the user's own
(`imported.py`), built from `config.model.kwargs`; the built-in models take
`config.model.activation` for every hidden layer (`activations.py`).
"""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import ml_collections

from pipeline.models import cnn
from pipeline.models import imported
from pipeline.models import lstm
from pipeline.models import mlp
from pipeline.models import ngrams
from pipeline.models import resnet

_MODELS: dict[str, Callable[[ml_collections.ConfigDict], nn.Module]] = {
    'mlp': mlp.from_config,
    'cnn': functools.partial(cnn.from_config, batch_norm=False),
    'cnn_bn': functools.partial(cnn.from_config, batch_norm=True),
    'resnet18': functools.partial(
        resnet.from_config, stage_sizes=(2, 2, 2, 2), block='basic'),
    'resnet34': functools.partial(
        resnet.from_config, stage_sizes=(3, 4, 6, 3), block='basic'),
    'resnet50': functools.partial(
        resnet.from_config, stage_sizes=(3, 4, 6, 3), block='bottleneck'),
    'resnet_small': functools.partial(resnet.from_config, block='basic'),
    'lstm': lstm.from_config,
    'ngrams': ngrams.from_config,
}

# Models whose training normalizes each batch by its own statistics.
BATCH_NORM_MODELS = ('cnn_bn', 'resnet18', 'resnet34', 'resnet50', 'resnet_small')


def make_model(config: ml_collections.ConfigDict, axis_name: str | None = None) -> nn.Module:
  """Builds the model named by `config.model.name`.

  `axis_name` is the pmap device axis, over which BatchNorm averages its statistics (under
  jit the arrays are global and BatchNorm already sees the whole batch).

  Raises:
    ValueError: the name is not registered; the message lists the valid names.
  """
  name = config.model.name
  if imported.is_import_path(name):
    # The user's model is the user's whole network: it gets no pmap axis or frozen-norm
    # switch, which only the built-in models know how to honour.
    return imported.build(config)
  if name not in _MODELS:
    raise ValueError(
        f'config.model.name={name!r} is invalid: valid names are {", ".join(_MODELS)}.')
  if name in BATCH_NORM_MODELS:
    # As in Keras, a frozen backbone's BatchNorm runs in inference mode while the head
    # trains, so training normalizes exactly as evaluation will.
    frozen_norm = any(p.rstrip('/') == 'backbone' for p in config.freeze)
    return _MODELS[name](config, axis_name=axis_name, frozen_norm=frozen_norm)
  return _MODELS[name](config)
