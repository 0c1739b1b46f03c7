"""A stacked LSTM text classifier over post-padded token ids (0 = pad).

embedding -> LSTM layer per `lstm_sizes` entry (dense + activation, relu by default,
between layers when `dense_size` > 0) -> the last layer's hidden state at each sequence's
last real token -> 'head'. Sequence lengths go to `nn.RNN`, so trailing padding never
changes the logits. With sigmoid_binary_cross_entropy the head is one logit.

Parameter paths: 'backbone/embed/embedding', 'backbone/lstm{i}/{ii,if,ig,io}/kernel',
'backbone/lstm{i}/{hi,hf,hg,ho}/{kernel,bias}', 'backbone/dense{i}/{kernel,bias}'
(between lstm{i} and lstm{i+1}), and 'head/{kernel,bias}'.

With a bfloat16 `dtype` the embedding and gate matmuls run in bfloat16 while the cell
state stays float32 (the carry takes the parameter dtype), so long sequences do not
accumulate bfloat16 rounding.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from pipeline import losses
from pipeline.models import activations


class LSTMBackbone(nn.Module):
  """Returns the last layer's hidden state at the last non-pad step, [batch, size]."""
  vocab_size: int
  embed_dim: int
  lstm_sizes: Sequence[int]
  dense_size: int = 0
  dtype: Any = jnp.float32
  activation: str = 'relu'  # Of the dense layers between LSTM layers.

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    # An all-pad row would have length 0, which nn.RNN reads as "the last step" and so
    # would depend on the amount of padding; step 0 keeps its logits padding-independent.
    lengths = jnp.maximum(jnp.sum(tokens != 0, axis=1), 1)
    x_BLD = nn.Embed(self.vocab_size, self.embed_dim, dtype=self.dtype,
                     param_dtype=jnp.float32, name='embed')(tokens)
    hidden = None
    for i, size in enumerate(self.lstm_sizes):
      if i > 0 and self.dense_size > 0:
        x_BLD = activations.get(self.activation)(nn.Dense(self.dense_size, dtype=self.dtype,
                                 param_dtype=jnp.float32, name=f'dense{i - 1}')(x_BLD))
      # Named here, the cell's parameters sit at 'lstm{i}' (nn.RNN itself has none).
      cell = nn.OptimizedLSTMCell(size, dtype=self.dtype, param_dtype=jnp.float32,
                                  name=f'lstm{i}')
      # With seq_lengths and return_carry, nn.RNN returns each row's carry at its own
      # last valid step instead of the carry after the padding.
      (_, hidden), x_BLD = nn.RNN(cell)(
          x_BLD, seq_lengths=lengths, return_carry=True)
    return hidden


class LSTMClassifier(nn.Module):
  """`LSTMBackbone` plus a linear classifier named 'head'."""
  num_classes: int
  vocab_size: int
  embed_dim: int
  lstm_sizes: Sequence[int]
  dense_size: int = 0
  dtype: Any = jnp.float32
  activation: str = 'relu'

  @nn.compact
  def __call__(self, tokens: jax.Array, *, train: bool) -> jax.Array:
    del train  # No dropout or batch statistics.
    x = LSTMBackbone(self.vocab_size, self.embed_dim, tuple(self.lstm_sizes),
                     self.dense_size, self.dtype, self.activation, name='backbone')(tokens)
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name='head')(x)
    return x.astype(jnp.float32)


def from_config(config: ml_collections.ConfigDict) -> LSTMClassifier:
  return LSTMClassifier(
      num_classes=losses.num_outputs(config), vocab_size=config.data.vocab_size,
      embed_dim=config.model.embed_dim, lstm_sizes=tuple(config.model.lstm_sizes),
      dense_size=config.model.lstm_dense_size, dtype=jnp.dtype(config.model.dtype),
      activation=config.model.activation)
