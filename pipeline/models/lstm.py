"""A stacked LSTM text classifier over post-padded token ids (0 = pad).

embedding -> LSTM layer per `lstm_sizes` entry (dense + activation, relu by default,
between layers when `dense_size` > 0) -> pooling over time -> 'head'. Pooling 'last' (the
book's model) takes the last layer's hidden state at each sequence's last real token;
'mean' and 'max' pool the last layer's outputs over the real tokens only. With
`bidirectional`, each layer also reads the sequence backwards (from its last real token)
and the two directions' features are concatenated. Sequence lengths go to `nn.RNN`, so
trailing padding never changes the logits. `dropout_rate` drops embedding features and the
pooled features before the head, in training only. With sigmoid_binary_cross_entropy the
head is one logit.

Parameter paths: 'backbone/embed/embedding', 'backbone/lstm{i}/{ii,if,ig,io}/kernel',
'backbone/lstm{i}/{hi,hf,hg,ho}/{kernel,bias}' (the backward direction of a bidirectional
layer: 'backbone/lstm{i}_backward/...'), 'backbone/dense{i}/{kernel,bias}' (between
lstm{i} and lstm{i+1}), and 'head/{kernel,bias}'.

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

from pipeline import config as config_lib
from pipeline import losses
from pipeline.models import activations

POOLINGS = config_lib.LSTM_POOLINGS


class LSTMBackbone(nn.Module):
  """Returns the pooled features of the last layer, [batch, size] (2 * size bidirectional)."""
  vocab_size: int
  embed_dim: int
  lstm_sizes: Sequence[int]
  dense_size: int = 0
  dtype: Any = jnp.float32
  activation: str = 'relu'  # Of the dense layers between LSTM layers.
  bidirectional: bool = False
  pooling: str = 'last'  # One of POOLINGS.
  dropout_rate: float = 0.0  # On the embeddings and on the pooled features.

  @nn.compact
  def __call__(self, tokens: jax.Array, *, train: bool = False) -> jax.Array:
    if self.pooling not in POOLINGS:
      raise ValueError(f'pooling={self.pooling!r}; valid: {", ".join(POOLINGS)}')
    # An all-pad row would have length 0, which nn.RNN reads as "the last step" and so
    # would depend on the amount of padding; step 0 keeps its logits padding-independent.
    lengths = jnp.maximum(jnp.sum(tokens != 0, axis=1), 1)
    x_BLD = nn.Embed(self.vocab_size, self.embed_dim, dtype=self.dtype,
                     param_dtype=jnp.float32, name='embed')(tokens)
    x_BLD = nn.Dropout(self.dropout_rate, deterministic=not train)(x_BLD)
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
      (_, hidden), out_BLH = nn.RNN(cell)(x_BLD, seq_lengths=lengths, return_carry=True)
      if self.bidirectional:
        back = nn.OptimizedLSTMCell(size, dtype=self.dtype, param_dtype=jnp.float32,
                                    name=f'lstm{i}_backward')
        # With seq_lengths, reverse flips each row within its own length, so the backward
        # pass starts at the last real token (not in the padding); keep_order puts its
        # outputs back in token order. Its final carry has read the whole row.
        (_, back_hidden), back_BLH = nn.RNN(back)(
            x_BLD, seq_lengths=lengths, return_carry=True, reverse=True, keep_order=True)
        hidden = jnp.concatenate([hidden, back_hidden], axis=-1)
        out_BLH = jnp.concatenate([out_BLH, back_BLH], axis=-1)
      x_BLD = out_BLH
    if self.pooling != 'last':
      # Outputs at pad positions are the cell run over padding: never let them in.
      real_BL1 = (jnp.arange(tokens.shape[1])[None, :] < lengths[:, None])[..., None]
      if self.pooling == 'mean':
        hidden = (jnp.sum(jnp.where(real_BL1, x_BLD, 0), axis=1)
                  / lengths[:, None].astype(x_BLD.dtype))
      else:
        hidden = jnp.max(jnp.where(real_BL1, x_BLD, jnp.finfo(x_BLD.dtype).min), axis=1)
    return nn.Dropout(self.dropout_rate, deterministic=not train)(hidden)


class LSTMClassifier(nn.Module):
  """`LSTMBackbone` plus a linear classifier named 'head'."""
  num_classes: int
  vocab_size: int
  embed_dim: int
  lstm_sizes: Sequence[int]
  dense_size: int = 0
  dtype: Any = jnp.float32
  activation: str = 'relu'
  bidirectional: bool = False
  pooling: str = 'last'
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, tokens: jax.Array, *, train: bool) -> jax.Array:
    x = LSTMBackbone(self.vocab_size, self.embed_dim, tuple(self.lstm_sizes),
                     self.dense_size, self.dtype, self.activation, self.bidirectional,
                     self.pooling, self.dropout_rate, name='backbone')(tokens, train=train)
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name='head')(x)
    return x.astype(jnp.float32)


def from_config(config: ml_collections.ConfigDict) -> LSTMClassifier:
  return LSTMClassifier(
      num_classes=losses.num_outputs(config), vocab_size=config.data.vocab_size,
      embed_dim=config.model.embed_dim, lstm_sizes=tuple(config.model.lstm_sizes),
      dense_size=config.model.lstm_dense_size, dtype=jnp.dtype(config.model.dtype),
      activation=config.model.activation, bidirectional=config.model.lstm_bidirectional,
      pooling=config.model.lstm_pooling, dropout_rate=config.model.lstm_dropout_rate)
