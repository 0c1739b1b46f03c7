"""A bag of n-grams text classifier (fastText's model) over post-padded token ids (0 = pad).

Each token id and each adjacent pair of real tokens (a bigram, hashed into `buckets`
rows) looks up an embedding; the mean over a row's real n-grams, after dropout in
training, goes to the linear 'head'. The bigrams are hashed on the device from the token
ids the text pipeline already makes, so the input and its vocabulary are the LSTM's.
Word order enters only through the bigrams: on short reviews this model beats the LSTM
(configs/rotten_tomatoes.py has both figures) and trains in seconds.

Parameter paths: 'backbone/embed/embedding' ([vocab_size + buckets, embed_dim]: unigrams
first, then bigram buckets) and 'head/{kernel,bias}'.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from pipeline import losses

# Knuth's multiplicative hash constant: spreads consecutive id pairs over the buckets.
_HASH = 2654435761


def bigram_buckets(tokens: jax.Array, buckets: int) -> jax.Array:
  """[batch, len - 1] bucket of each adjacent (token, next token) pair, in [0, buckets)."""
  first = tokens[:, :-1].astype(jnp.uint32)
  second = tokens[:, 1:].astype(jnp.uint32)
  # uint32 arithmetic wraps: a hash of the pair, deterministic on every backend.
  return ((first * jnp.uint32(_HASH) + second) % jnp.uint32(buckets)).astype(jnp.int32)


class NgramBackbone(nn.Module):
  """Returns the mean embedding of each row's real unigrams and bigrams, [batch, embed_dim]."""
  vocab_size: int
  embed_dim: int
  buckets: int = 0  # Hashed bigram rows; 0 = unigrams only.
  dtype: Any = jnp.float32
  dropout_rate: float = 0.0  # On the pooled features, in training only.

  @nn.compact
  def __call__(self, tokens: jax.Array, *, train: bool = False) -> jax.Array:
    real_BL = tokens != 0
    ids_BN, real_BN = tokens, real_BL
    if self.buckets:  # A one-token row has no pairs: the bigram arrays are empty.
      # A bigram is real when both its tokens are: padding never forms one.
      ids_BN = jnp.concatenate([tokens, self.vocab_size + bigram_buckets(tokens, self.buckets)],
                               axis=1)
      real_BN = jnp.concatenate([real_BL, real_BL[:, :-1] & real_BL[:, 1:]], axis=1)
    x_BND = nn.Embed(self.vocab_size + self.buckets, self.embed_dim, dtype=self.dtype,
                     param_dtype=jnp.float32, name='embed')(ids_BN)
    weight_BN1 = real_BN[..., None].astype(x_BND.dtype)
    # An all-pad row pools to zeros (count clipped at 1), so its logits are the head's bias.
    count_B1 = jnp.maximum(jnp.sum(weight_BN1, axis=1), 1)
    pooled = jnp.sum(x_BND * weight_BN1, axis=1) / count_B1
    return nn.Dropout(self.dropout_rate, deterministic=not train)(pooled)


class NgramClassifier(nn.Module):
  """`NgramBackbone` plus a linear classifier named 'head'."""
  num_classes: int
  vocab_size: int
  embed_dim: int
  buckets: int = 0
  dtype: Any = jnp.float32
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, tokens: jax.Array, *, train: bool) -> jax.Array:
    x = NgramBackbone(self.vocab_size, self.embed_dim, self.buckets, self.dtype,
                      self.dropout_rate, name='backbone')(tokens, train=train)
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name='head')(x)
    return x.astype(jnp.float32)


def from_config(config: ml_collections.ConfigDict) -> NgramClassifier:
  return NgramClassifier(
      num_classes=losses.num_outputs(config), vocab_size=config.data.vocab_size,
      embed_dim=config.model.embed_dim, buckets=config.model.ngram_buckets,
      dtype=jnp.dtype(config.model.dtype), dropout_rate=config.model.dropout_rate)
