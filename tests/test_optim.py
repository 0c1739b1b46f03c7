"""Tests for pipeline/optim.py: every optimizer trains, schedules, decay mask, freezing."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pipeline import config as config_lib
from pipeline import optim


def _config(name='sgd', **optimizer):
  config = config_lib.base_config()
  config.optimizer.name = name
  config.optimizer.schedule = 'constant'
  for key, value in optimizer.items():
    config.optimizer[key] = value
  return config


def _params():
  """A linear classifier shaped like a model: a 'backbone' with a norm scale, a 'head'."""
  rng = np.random.default_rng(0)
  return {
      'backbone': {'Dense_0': {'kernel': jnp.asarray(rng.normal(size=(6, 8)) * 0.3,
                                                     jnp.float32),
                               'bias': jnp.zeros(8)},
                   'Norm_0': {'scale': jnp.ones(8)}},
      'head': {'kernel': jnp.asarray(rng.normal(size=(8, 3)) * 0.3, jnp.float32),
               'bias': jnp.zeros(3)},
  }


def _data():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(32, 6)).astype(np.float32)
  y = np.argmax(x @ rng.normal(size=(6, 3)), axis=1)
  return jnp.asarray(x), jnp.asarray(y)


def _loss(params, x, y):
  b, h = params['backbone'], params['head']
  features = (x @ b['Dense_0']['kernel'] + b['Dense_0']['bias']) * b['Norm_0']['scale']
  logits = features @ h['kernel'] + h['bias']
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _train(config, steps):
  """Runs `steps` updates in one compiled loop; returns (first loss, last loss, params)."""
  tx, _ = optim.make_optimizer(config, num_train_steps=100)
  x, y = _data()
  params = _params()

  def grads_fn(params):
    if optim.needs_per_example_grads(config):
      per_example = jax.vmap(jax.grad(_loss), in_axes=(None, 0, 0))
      return per_example(params, x[:, None], y[:, None])
    return jax.grad(_loss)(params, x, y)

  @jax.jit
  def run(params):
    def step(carry, _):
      params, opt_state = carry
      updates, opt_state = tx.update(grads_fn(params), opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None
    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
    return params

  final = run(params)
  return float(_loss(params, x, y)), float(_loss(final, x, y)), final


# Rates at which each optimizer makes clear progress in 20 steps (0.05 otherwise): the
# non-adaptive ones and the relative-step ones (adafactor, fromage) want larger rates; lars
# gives biases plain lr steps and kernels lr * 1e-3 trust-ratio steps.
_LEARNING_RATES = {'lars': 0.5, 'adafactor': 0.1, 'fromage': 0.1, 'sgd': 0.1, 'dpsgd': 0.1,
                   'noisy_sgd': 0.1, 'optimistic_gradient_descent': 0.1}


@pytest.mark.parametrize('name', config_lib.OPTIMIZERS)
def test_every_optimizer_lowers_the_loss(name):
  config = _config(name, learning_rate=_LEARNING_RATES.get(name, 0.05), weight_decay=1e-4,
                   dp_noise_multiplier=0.1, dp_l2_clip=1.0)
  first, last, _ = _train(config, steps=20)
  assert last < 0.9 * first, (first, last)


def test_names_match_the_schema_and_unknown_names_raise():
  assert sorted(optim.VALID_NAMES) == sorted(config_lib.OPTIMIZERS)
  with pytest.raises(ValueError, match='valid names are adabelief, adafactor, .*, yogi'):
    optim.make_optimizer(_config('adamax'), 10)
  with pytest.raises(ValueError, match='valid schedules are constant, warmup_cosine'):
    optim.make_optimizer(_config(schedule='linear'), 10)


def test_needs_per_example_grads_only_for_dpsgd():
  assert [n for n in config_lib.OPTIMIZERS if optim.needs_per_example_grads(_config(n))] == [
      'dpsgd']


def test_warmup_cosine_schedule():
  config = _config(schedule='warmup_cosine', learning_rate=1.0, warmup_steps=10,
                   end_lr_fraction=0.1)
  _, schedule = optim.make_optimizer(config, num_train_steps=110)
  # Linear from 0 to the peak, then half a cosine down to 0.1 over the other 100 steps.
  for step, expected in [(0, 0.0), (5, 0.5), (10, 1.0), (60, 0.55), (110, 0.1), (500, 0.1)]:
    np.testing.assert_allclose(schedule(step), expected, atol=1e-6)
  with pytest.raises(ValueError, match='optimizer.warmup_steps=10'):
    optim.make_optimizer(config, num_train_steps=10)


def test_constant_and_piecewise_schedules():
  _, constant = optim.make_optimizer(_config(learning_rate=0.3), 100)
  assert float(constant(0)) == float(constant(99)) == pytest.approx(0.3)
  config = _config(schedule='piecewise', learning_rate=1.0, boundaries=(10, 20),
                   scales=(0.1, 0.5))
  _, piecewise = optim.make_optimizer(config, 100)
  # optax scales from the boundary step itself on.
  for step, expected in [(0, 1.0), (9, 1.0), (10, 0.1), (19, 0.1), (20, 0.05)]:
    np.testing.assert_allclose(piecewise(step), expected, rtol=1e-6)


def test_learning_rate_follows_the_schedule_inside_the_optimizer():
  config = _config('sgd', momentum=0.0, schedule='piecewise', learning_rate=1.0,
                   boundaries=(1,), scales=(0.5,))
  tx, _ = optim.make_optimizer(config, 10)
  params = {'w': jnp.zeros(2)}
  grads = {'w': jnp.ones(2)}
  state = tx.init(params)
  first, state = tx.update(grads, state, params)
  second, state = tx.update(grads, state, params)
  third, _ = tx.update(grads, state, params)
  # The schedule is read at the update count: 0 for the first update, 1 for the second.
  np.testing.assert_allclose([first['w'][0], second['w'][0], third['w'][0]], [-1, -0.5, -0.5])


def test_decay_mask_keeps_biases_and_scales_out():
  mask = optim.decay_mask(_params())
  assert mask == {'backbone': {'Dense_0': {'kernel': True, 'bias': False},
                               'Norm_0': {'scale': False}},
                  'head': {'kernel': True, 'bias': False}}


@pytest.mark.parametrize('name', ['sgd', 'adam', 'adamw', 'rmsprop', 'radam'])
def test_weight_decay_shrinks_only_kernels(name):
  # With zero gradients the whole update is the decay term, -lr * wd * param.
  config = _config(name, learning_rate=0.5, weight_decay=0.1, momentum=0.0)
  tx, _ = optim.make_optimizer(config, 10)
  params = _params()
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  for path, update in jax.tree_util.tree_leaves_with_path(updates):
    param = dict(jax.tree_util.tree_leaves_with_path(params))[path]
    expected = -0.05 * param if param.ndim >= 2 else jnp.zeros_like(param)
    np.testing.assert_allclose(update, expected, rtol=1e-5, atol=1e-7,
                               err_msg=jax.tree_util.keystr(path))


def test_lamb_decay_shrinks_only_kernels():
  # lamb rescales the decayed update by its trust ratio, so only the direction is fixed.
  tx, _ = optim.make_optimizer(_config('lamb', weight_decay=0.1), 10)
  params = _params()
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  for update, param in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
    if param.ndim >= 2:
      assert bool(jnp.all(update * param < 0))
    else:
      assert not update.any()


def test_clipping_bounds_the_update_norm():
  config = _config('sgd', learning_rate=1.0, momentum=0.0, clip_grad_norm=0.5)
  tx, _ = optim.make_optimizer(config, 10)
  params = _params()
  grads = jax.tree.map(lambda p: jnp.full_like(p, 3.0), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(optax.tree.norm(updates), 0.5, rtol=1e-5)


@pytest.mark.parametrize('name', config_lib.OPTIMIZERS)
def test_frozen_prefixes_get_exactly_zero_updates(name):
  config = _config(name, learning_rate=0.1, weight_decay=0.1, clip_grad_norm=1.0)
  config.freeze = ('backbone/Dense_0',)
  _, _, final = _train(config, steps=3)
  initial = _params()
  np.testing.assert_array_equal(final['backbone']['Dense_0']['kernel'],
                                initial['backbone']['Dense_0']['kernel'])
  np.testing.assert_array_equal(final['backbone']['Dense_0']['bias'],
                                initial['backbone']['Dense_0']['bias'])
  assert not np.array_equal(final['head']['kernel'], initial['head']['kernel'])


def test_freeze_matches_whole_path_components():
  config = _config('sgd')
  config.freeze = ('Dense_1',)
  tx, _ = optim.make_optimizer(config, 10)
  params = {'Dense_1': {'kernel': jnp.ones((2, 2))}, 'Dense_10': {'kernel': jnp.ones((2, 2))}}
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  assert not updates['Dense_1']['kernel'].any()
  assert updates['Dense_10']['kernel'].all()


def test_freeze_prefix_that_matches_nothing_raises():
  config = _config('sgd')
  config.freeze = ('backbone', 'encoder')
  tx, _ = optim.make_optimizer(config, 10)
  with pytest.raises(ValueError, match=r"config.freeze=.*\['encoder'\] match no parameter"):
    tx.init(_params())


def test_param_paths():
  assert optim.param_paths(_params()) == [
      'backbone/Dense_0/bias', 'backbone/Dense_0/kernel', 'backbone/Norm_0/scale',
      'head/bias', 'head/kernel']


def _decay_only(config, steps):
  """A kernel's values after `steps` updates on zero gradients: only the decay acts."""
  tx, _ = optim.make_optimizer(config, 10)
  params = {'kernel': jnp.full((2, 2), 1.0)}

  @jax.jit
  def run(params):
    def step(carry, _):
      params, state = carry
      updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
      params = optax.apply_updates(params, updates)
      return (params, state), params['kernel'][0, 0]
    return jax.lax.scan(step, (params, tx.init(params)), None, length=steps)[1]
  return np.asarray(run(params), np.float64)


@pytest.mark.parametrize('nesterov', [False, True])
def test_coupled_and_decoupled_sgd_weight_decay_differ_as_derived(nesterov):
  lr, wd, momentum, steps = 0.1, 0.01, 0.9, 300
  config = _config('sgd', learning_rate=lr, weight_decay=wd, momentum=momentum,
                   nesterov=nesterov)
  decoupled = _decay_only(config, steps)
  config.optimizer.weight_decay_coupled = True
  coupled = _decay_only(config, steps)
  # Decoupled: the momentum never sees the decay, p <- (1 - lr wd) p.
  np.testing.assert_allclose(decoupled, (1 - lr * wd) ** np.arange(1, steps + 1), rtol=1e-5)
  # Coupled: wd p joins the gradient, m <- momentum m + wd p, then p <- p - lr m (Nesterov:
  # p <- p - lr (wd p + momentum m)).
  p, m, expected = 1.0, 0.0, []
  for _ in range(steps):
    g = wd * p
    m = momentum * m + g
    p -= lr * (g + momentum * m if nesterov else m)
    expected.append(p)
  np.testing.assert_allclose(coupled, expected, rtol=1e-4)
  # Once the momentum has built up, p shrinks by a steady factor x = 1 - r a step, and
  # m = wd p / (1 - momentum / x), so x = 1 - lr wd / (1 - momentum / x) (Nesterov:
  # 1 - lr wd (1 + momentum / (1 - momentum / x))). To first order in lr wd both give
  # r = lr wd / (1 - momentum): 10x the decoupled lr wd at momentum 0.9.
  x = 1.0
  for _ in range(100):  # The fixed point, from x = 1.
    boost = 1 / (1 - momentum / x)
    x = 1 - lr * wd * (1 + momentum * boost if nesterov else boost)
  rate = 1 - coupled[-1] / coupled[-2]
  np.testing.assert_allclose(rate, 1 - x, rtol=1e-3)
  assert 1 / (1 - momentum) <= rate / (lr * wd) <= 1.15 / (1 - momentum)


def test_coupled_weight_decay_refused_where_the_optimizer_decays_itself():
  with pytest.raises(ValueError, match=r'weight_decay_coupled=True is invalid for '
                                       r"optimizer.name='adamw'"):
    optim.make_optimizer(_config('adamw', weight_decay=0.1, weight_decay_coupled=True), 10)
