"""Tests for pipeline/models: shapes, exact sizes, one training step, train/eval modes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pipeline import config as config_lib
from pipeline import models
from pipeline.models import activations
from pipeline.models import resnet

BN_MODELS = ('cnn_bn', 'resnet18', 'resnet34', 'resnet50', 'resnet_small')


def _config(name, **model):
  """A tiny variant of `name` that compiles and runs in well under a second."""
  config = config_lib.base_config()
  config.model.name = name
  config.model.hidden_size = 16
  config.model.width = 4
  config.model.stage_sizes = (1, 1)
  config.model.embed_dim = 8
  config.model.lstm_sizes = (8, 6)
  config.model.lstm_dense_size = 5
  config.model.ngram_buckets = 64
  config.data.vocab_size = 50
  config.data.num_classes = 3
  for key, value in model.items():
    config.model[key] = value
  return config


def _inputs(name, batch=4):
  rng = np.random.default_rng(0)
  if name in ('lstm', 'ngrams'):
    tokens = rng.integers(1, 50, size=(batch, 7))
    for row, length in enumerate(rng.integers(1, 7, size=batch)):
      tokens[row, length:] = 0
    return jnp.asarray(tokens, jnp.int32)
  return jnp.asarray(rng.normal(size=(batch, 16, 16, 1)), jnp.float32)


def _init(model, x):
  return model.init({'params': jax.random.key(0), 'dropout': jax.random.key(1)}, x,
                    train=False)


def _num_params(tree):
  return sum(leaf.size for leaf in jax.tree.leaves(tree))


def _abstract_variables(config, x):
  """Shapes and dtypes of the variables for input `x` (an array or ShapeDtypeStruct)."""
  model = models.make_model(config)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)


def _image(*shape):
  return jax.ShapeDtypeStruct(shape, jnp.float32)


def test_registry_covers_the_schema_and_rejects_unknown_names():
  for name in config_lib.MODELS:
    assert isinstance(models.make_model(_config(name)), nn.Module)
  with pytest.raises(ValueError, match='valid names are mlp, cnn, cnn_bn, resnet18'):
    models.make_model(_config('transformer'))


@pytest.mark.parametrize('name', config_lib.MODELS)
def test_output_shape_head_and_collections(name):
  config = _config(name)
  x = _inputs(name)
  variables = _abstract_variables(config, x)
  assert set(variables['params']) == {'backbone', 'head'}
  assert variables['params']['head']['kernel'].shape[-1] == 3
  assert ('batch_stats' in variables) == (name in BN_MODELS)
  logits = jax.eval_shape(
      lambda v: models.make_model(config).apply(v, x, train=False), variables)
  assert logits.shape == (4, 3) and logits.dtype == jnp.float32


@pytest.mark.parametrize('name, expected', [
    # 784*256 + 256 (hidden) + 256*10 + 10 (head).
    ('mlp', 203_530),
    # conv 3*3*1*32 + 32, conv 3*3*32*64 + 64, dense 7*7*64*256 + 256, head 256*10 + 10.
    ('cnn', 824_458),
    # cnn without the two conv biases (96), plus BatchNorm scale and bias (2*32 + 2*64).
    ('cnn_bn', 824_554),
])
def test_fashion_mnist_parameter_counts(name, expected):
  config = config_lib.base_config()
  config.model.name = name
  variables = _abstract_variables(config, _image(1, 28, 28, 1))
  assert _num_params(variables['params']) == expected


@pytest.mark.parametrize('name, expected', [
    # torchvision's counts for the same architectures (BatchNorm scale/bias included).
    ('resnet18', 11_689_512), ('resnet34', 21_797_672), ('resnet50', 25_557_032)])
def test_standard_resnet_parameter_counts(name, expected):
  config = config_lib.base_config()
  config.model.name = name
  config.model.stem = 'imagenet'
  config.data.num_classes = 1000
  # Parameter count does not depend on resolution; 64 px keeps tracing short.
  variables = _abstract_variables(config, _image(1, 64, 64, 3))
  assert _num_params(variables['params']) == expected


def _train_step_changes_everything(model, x, has_batch_stats):
  variables = _init(model, x)
  labels = jnp.arange(x.shape[0]) % 3
  tx = optax.sgd(0.1)

  @jax.jit
  def step(variables):
    def loss_fn(params):
      logits, new_state = model.apply(
          {**variables, 'params': params}, x, train=True, mutable=['batch_stats'],
          rngs={'dropout': jax.random.key(2)})
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, new_state
    grads, new_state = jax.grad(loss_fn, has_aux=True)(variables['params'])
    updates, _ = tx.update(grads, tx.init(variables['params']))
    return {**new_state, 'params': optax.apply_updates(variables['params'], updates)}

  new_variables = step(variables)
  assert ('batch_stats' in new_variables) == has_batch_stats
  for collection in new_variables:
    flat_old = dict(jax.tree_util.tree_leaves_with_path(variables[collection]))
    for path, new in jax.tree_util.tree_leaves_with_path(new_variables[collection]):
      assert not np.allclose(flat_old[path], new), (
          f'{collection}/{jax.tree_util.keystr(path)} did not change')


# resnet18/34 are resnet_small with other stage sizes; compiling them takes many seconds.
@pytest.mark.parametrize('name, stem', [
    ('mlp', 'small'), ('cnn', 'small'), ('cnn_bn', 'small'), ('resnet_small', 'small'),
    ('resnet_small', 'imagenet'), ('lstm', 'small'), ('ngrams', 'small')])
def test_one_train_step_changes_every_parameter_and_batch_stat(name, stem):
  model = models.make_model(_config(name, stem=stem))
  _train_step_changes_everything(model, _inputs(name), name in BN_MODELS)


def test_bottleneck_train_step_changes_every_parameter():
  # resnet50's block at a size that compiles quickly; resnet50's shape is checked above.
  model = resnet.ResNet(num_classes=3, stage_sizes=(1, 1), block='bottleneck', width=2)
  _train_step_changes_everything(model, _inputs('cnn'), has_batch_stats=True)


def test_eval_uses_running_averages_and_no_dropout():
  model = models.make_model(_config('cnn_bn', dropout_rate=0.5))
  x = _inputs('cnn_bn')
  variables = _init(model, x)
  first = model.apply(variables, x, train=False)
  np.testing.assert_array_equal(first, model.apply(variables, x, train=False))
  # Running averages make each example's output independent of the rest of the batch.
  np.testing.assert_allclose(model.apply(variables, x[:1], train=False), first[:1],
                             rtol=1e-5, atol=1e-6)

  def train(seed):
    logits, _ = model.apply(variables, x, train=True, mutable=['batch_stats'],
                            rngs={'dropout': jax.random.key(seed)})
    return logits
  assert not np.allclose(train(0), train(1))
  np.testing.assert_array_equal(train(0), train(0))


# The book's model, and the pooled bidirectional ones (whose backward pass starts at the
# last real token, so a token added at the end changes even a max over time).
@pytest.mark.parametrize('bidirectional,pooling', [
    (False, 'last'), (True, 'mean'), (True, 'max')])
def test_lstm_ignores_trailing_padding(bidirectional, pooling):
  config = _config('lstm', lstm_bidirectional=bidirectional, lstm_pooling=pooling,
                   lstm_dropout_rate=0.5)  # Dropout is off in eval mode: exact equality.
  model = models.make_model(config)
  tokens = _inputs('lstm')
  tokens = tokens.at[0].set(0)  # An all-pad row must not depend on the padding either.
  variables = _init(model, tokens)
  padded = jnp.pad(tokens, ((0, 0), (0, 9)))
  assert np.isfinite(model.apply(variables, tokens, train=False)).all()
  np.testing.assert_array_equal(model.apply(variables, tokens, train=False),
                                model.apply(variables, padded, train=False))
  # Changing a pad position into a real token does change the logits.
  longer = padded.at[1, tokens.shape[1]].set(7)
  assert not np.allclose(model.apply(variables, longer, train=False)[1],
                         model.apply(variables, padded, train=False)[1])
  if bidirectional:  # Both directions have their own cell.
    assert {'lstm0_backward', 'lstm1_backward'} <= set(variables['params']['backbone'])


def test_lstm_dropout_acts_in_training_only():
  model = models.make_model(_config('lstm', lstm_bidirectional=True, lstm_pooling='max',
                                    lstm_dropout_rate=0.5))
  tokens = _inputs('lstm')
  variables = _init(model, tokens)
  train = lambda seed: model.apply(variables, tokens, train=True,
                                   rngs={'dropout': jax.random.key(seed)})
  assert not np.allclose(train(0), train(1))
  np.testing.assert_array_equal(model.apply(variables, tokens, train=False),
                                model.apply(variables, tokens, train=False))


@pytest.mark.parametrize('key,value,message', [
    ('lstm_pooling', 'avg', r"config.model.lstm_pooling='avg' is invalid: .*last, mean, max"),
    ('lstm_dropout_rate', 1.0, r'config.model.lstm_dropout_rate=1.0 is invalid'),
    ('lstm_dropout_rate', -0.1, r'config.model.lstm_dropout_rate=-0.1 is invalid')])
def test_invalid_lstm_keys_fail_in_validate_naming_the_key(key, value, message):
  with pytest.raises(ValueError, match=message):
    config_lib.validate(_config('lstm', **{key: value}), num_devices=8, num_processes=1)


@pytest.mark.parametrize('buckets', [0, 64])
def test_ngrams_pool_real_tokens_and_bigrams_only(buckets):
  model = models.make_model(_config('ngrams', ngram_buckets=buckets, dropout_rate=0.5))
  tokens = _inputs('ngrams').at[0].set(0)  # An all-pad row too.
  variables = _init(model, tokens)
  logits = lambda x: model.apply(variables, x, train=False)
  padded = jnp.pad(tokens, ((0, 0), (0, 9)))
  assert np.isfinite(logits(tokens)).all()
  np.testing.assert_allclose(logits(tokens), logits(padded), rtol=1e-6, atol=1e-6)
  embedding = variables['params']['backbone']['embed']['embedding']
  assert embedding.shape == (50 + buckets, 8)
  # Word order reaches the logits through the bigrams alone.
  row = jnp.asarray([[5, 9, 17, 0]], jnp.int32)
  swapped = jnp.asarray([[9, 5, 17, 0]], jnp.int32)
  assert np.allclose(logits(row), logits(swapped), atol=1e-6) == (buckets == 0)
  # Dropout acts in training only.
  train = lambda seed: model.apply(variables, tokens, train=True,
                                   rngs={'dropout': jax.random.key(seed)})
  assert not np.allclose(train(0), train(1))


@pytest.mark.parametrize('key,value,message', [
    ('ngram_buckets', -1, r'config.model.ngram_buckets=-1 is invalid'),
    ('dropout_rate', 1.0, r'config.model.dropout_rate=1.0 is invalid')])
def test_invalid_ngram_keys_fail_in_validate_naming_the_key(key, value, message):
  with pytest.raises(ValueError, match=message):
    config_lib.validate(_config('ngrams', **{key: value}), num_devices=8, num_processes=1)


@pytest.mark.parametrize('name', ['mlp', 'cnn_bn', 'resnet_small', 'lstm', 'ngrams'])
def test_bfloat16_computes_in_bfloat16_with_float32_params(name):
  model = models.make_model(_config(name, dtype='bfloat16'))
  x = _inputs(name)
  variables = _init(model, x)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
  logits, state = model.apply(variables, x, train=False, capture_intermediates=True)
  assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
  inner = state['intermediates']['backbone']
  # The LSTM keeps its cell state in float32 (see lstm.py); its embedding is bfloat16.
  activation = inner['embed']['__call__'][0] if name in ('lstm', 'ngrams') else inner['__call__'][0]
  assert activation.dtype == jnp.bfloat16
  assert state['intermediates']['head']['__call__'][0].dtype == jnp.bfloat16


def _fit(model, x, num_steps=25):
  """Adam on one fixed batch: the losses of `num_steps` steps, and the final variables."""
  variables = _init(model, x)
  labels = jnp.arange(x.shape[0]) % 3
  tx = optax.adam(1e-2)

  def loss_fn(params):
    logits = model.apply({**variables, 'params': params}, x, train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  params, opt_state, losses = variables['params'], tx.init(variables['params']), []
  for _ in range(num_steps):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  return losses, variables['params'], params


@pytest.mark.parametrize('activation', activations.NAMES)
def test_every_activation_builds_and_trains(activation):
  model = models.make_model(_config('mlp', activation=activation))
  x = _inputs('mlp', batch=8)
  losses, before, after = _fit(model, x)
  assert losses[-1] < 0.5 * losses[0], losses
  if activation == 'prelu':  # Its slope is a parameter beside the layer, and it learns.
    slope = ('backbone', 'PReLU_0', 'negative_slope')
    assert before[slope[0]][slope[1]][slope[2]] == pytest.approx(0.01)
    assert after[slope[0]][slope[1]][slope[2]] != pytest.approx(0.01)
  else:
    assert set(before['backbone']) == {'Dense_0'}  # The default's paths, for any fixed one.
  # The activation is the one asked for: relu's output differs from any other's.
  if activation != 'relu':
    relu = models.make_model(_config('mlp'))
    assert not np.allclose(model.apply(_init(model, x), x, train=False),
                           relu.apply(_init(relu, x), x, train=False))


@pytest.mark.parametrize('name', ['cnn_bn', 'resnet_small', 'lstm'])
def test_activation_reaches_every_hidden_layer_of_the_other_models(name):
  """prelu: one learned slope per activation call (shapes only: the mlp test trains it)."""
  model = models.make_model(_config(name, activation='prelu'))
  variables = jax.eval_shape(lambda x: _init(model, x), _inputs(name))
  slopes = [path for path, _ in jax.tree_util.tree_leaves_with_path(variables['params'])
            if 'PReLU' in jax.tree_util.keystr(path)]
  # cnn_bn: 2 convs + dense; resnet_small (2 stages of 1 block): stem + 2 per block;
  # lstm (2 layers, a dense between): 1.
  assert len(slopes) == {'cnn_bn': 3, 'resnet_small': 5, 'lstm': 1}[name]


def test_unknown_activation_names_the_key_and_the_valid_names():
  with pytest.raises(ValueError, match=r"config.model.activation='swish' is invalid: allowed "
                                       r'values are relu, gelu, elu'):
    config_lib.validate(_config('mlp', activation='swish'), num_devices=8, num_processes=1)


@pytest.mark.parametrize('block,last', [('basic', 'bn2'), ('bottleneck', 'bn3')])
def test_zero_init_residual_zeroes_each_blocks_last_norm_scale_only(block, last):
  # Two stages of one block each (resnet_small's shape) of either block kind.
  model = resnet.from_config(_config('resnet_small', zero_init_residual=True), block=block)
  x = _inputs('resnet_small', batch=2)
  variables = model.init(jax.random.key(0), x, train=False)
  scales = {jax.tree_util.keystr(path): leaf for path, leaf
            in jax.tree_util.tree_leaves_with_path(variables['params'])
            if path[-1].key == 'scale'}
  zeroed = {p for p, s in scales.items() if not np.any(s)}
  assert zeroed == {p for p in scales if f"'{last}'" in p} and len(zeroed) == 2
  assert all(np.all(scales[p] == 1) for p in scales if p not in zeroed)
  # With every residual branch at zero the blocks pass their shortcut on, so the output
  # does not depend on the branch convolutions' kernels.
  def scaled(path, value):
    name = jax.tree_util.keystr(path)
    return value * 3 if "'conv" in name and 'block' in name else value
  changed = jax.tree_util.tree_map_with_path(scaled, variables['params'])
  np.testing.assert_allclose(model.apply(variables, x, train=False),
                             model.apply({**variables, 'params': changed}, x, train=False),
                             rtol=1e-6, atol=1e-6)
  default = resnet.from_config(_config('resnet_small'), block=block)
  # The default keeps flax's ones for every scale.
  default_params = default.init(jax.random.key(0), x, train=False)['params']
  assert all(np.all(leaf == 1) for path, leaf in jax.tree_util.tree_leaves_with_path(
      default_params) if path[-1].key == 'scale')
