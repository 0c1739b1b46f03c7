"""Models named by import path: `config.model.name='my_package.my_module:MyNet'`.

`MyNet` is a `flax.linen.Module` or a `flax.nnx.Module` class in any importable module
(on PYTHONPATH or under the working directory, e.g. `configs.fashion_mnist_nnx:CNN`). It
is built from `config.model.kwargs`, the keys the user's config file declares:

  Linen: MyNet(**kwargs), called as model(x, train=bool) and returning float32 outputs
         [batch, num_outputs] (the loss's width: data.num_classes, or 1 for
         sigmoid_binary_cross_entropy).
  NNX:   MyNet(**kwargs, rngs=nnx.Rngs(...)), called as model(x) after model.train() or
         model.eval(); `nnx_adapter.NNXModel` turns it into a Linen module.

Dropout draws from the 'dropout' rng stream, BatchNorm keeps its statistics in
'batch_stats' (nnx.BatchStat); both then resume and shard like a built-in model's.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from flax import nnx
from flax.core import frozen_dict
import flax.linen as nn
import ml_collections

from pipeline.models import nnx_adapter


def is_import_path(name: str) -> bool:
  return ':' in name


def _invalid(name: str, why: str) -> ValueError:
  return ValueError(f'config.model.name={name!r} is invalid: {why}.')


def resolve(name: str) -> type:
  """The Linen or NNX Module class `module.path:Attr` names.

  Raises:
    ValueError: the module does not import, has no such attribute, or it is not a Flax
      Module class; the message names config.model.name.
  """
  module_name, _, attribute = name.partition(':')
  if not module_name or not attribute:
    raise _invalid(name, "expected 'package.module:ClassName'")
  try:
    target = importlib.import_module(module_name)
  except ImportError as e:
    raise _invalid(name, f'module {module_name!r} does not import ({e}); it must be '
                   'importable from the working directory or PYTHONPATH') from e
  for part in attribute.split('.'):
    if not hasattr(target, part):
      raise _invalid(name, f'{module_name} has no attribute {attribute!r}')
    target = getattr(target, part)
  if not isinstance(target, type) or not issubclass(target, (nn.Module, nnx.Module)):
    raise _invalid(name, f'{attribute} is not a flax.linen.Module or flax.nnx.Module class '
                   f'(got {target!r})')
  return target


def _kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  kwargs = config.model.kwargs
  return kwargs.to_dict() if isinstance(kwargs, ml_collections.ConfigDict) else dict(kwargs)


def check(config: ml_collections.ConfigDict) -> None:
  """Fails before anything is built if the class does not take `config.model.kwargs`."""
  cls, kwargs = resolve(config.model.name), _kwargs(config)
  extra = {'rngs': None} if issubclass(cls, nnx.Module) else {}
  try:
    # __init__'s own signature: NNX's metaclass makes the class's (*args, **kwargs).
    inspect.signature(cls.__init__).bind(None, **kwargs, **extra)
  except TypeError as e:
    raise ValueError(f'config.model.kwargs={kwargs} is invalid for '
                     f'config.model.name={config.model.name!r}: {e}.') from None


def build(config: ml_collections.ConfigDict) -> nn.Module:
  """The model of `config.model.name` (an import path) as a Linen module."""
  check(config)
  cls, kwargs = resolve(config.model.name), _kwargs(config)
  if issubclass(cls, nnx.Module):
    return nnx_adapter.NNXModel(cls, kwargs=frozen_dict.FrozenDict(kwargs))
  return cls(**kwargs)
