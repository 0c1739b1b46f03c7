"""Optimizers and learning-rate schedules by name, built from optax; freezing by param path.

`make_optimizer(config, num_train_steps)` returns `(tx, schedule)`. From the outside in:

  optax.multi_transform     params under a `config.freeze` prefix get exactly zero updates
    [dpsgd only]            per-example clipping and noise, then the batch mean
    clip_by_global_norm     when optimizer.clip_grad_norm > 0
    the optimizer           with decoupled weight decay on kernels and the lr schedule

Call `tx.update(grads, opt_state, params)` with `params`: weight decay, lars, lamb, fromage
and adafactor read them. For dpsgd the grads must be per-example, stacked on a leading axis
(see `needs_per_example_grads`).

Weight decay (optimizer.weight_decay > 0) touches only parameters with ndim >= 2 (dense and
conv kernels, embeddings), never biases or norm scales. With optimizer.weight_decay_coupled
it is L2 regularisation: weight_decay * param joins the gradient before the optimizer's own
steps (momentum), as the ResNet recipes' SGD defines it (the gradient of the Flax ImageNet
example's `weight_decay / 2 * sum(kernel ** 2)` loss term); under momentum m the decay then
accumulates like the gradient, about 1 / (1 - m) = 10x stronger at m = 0.9 than the
decoupled form of the same value. Otherwise it is decoupled (AdamW-style: added to the
update direction, then scaled by the lr) for every optimizer except:
  adafactor  its own `weight_decay_rate`, added after the lr (so not scaled by it);
  fromage    no decay of its own; the decay term joins the gradient before its trust ratio.

The optimizers without a weight-decay argument in optax are rebuilt here from the same
`optax.scale_by_*` steps their optax alias chains (for example `optax.adam` is
`scale_by_adam` then `scale_by_learning_rate`), so the decay can sit between the two.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
import optax.contrib

_FROZEN, _TRAINABLE = 'frozen', 'trainable'


def make_schedule(config: ml_collections.ConfigDict, num_train_steps: int) -> optax.Schedule:
  """The learning rate at each update step, from config.optimizer.schedule.

  Raises:
    ValueError: unknown schedule, or warmup that does not leave any steps to decay over.
  """
  o = config.optimizer
  lr = o.learning_rate
  if o.schedule == 'constant':
    return optax.constant_schedule(lr)
  if o.schedule == 'warmup_cosine':
    if o.warmup_steps >= num_train_steps:
      raise ValueError(
          f'config.optimizer.warmup_steps={o.warmup_steps} is invalid: it must be smaller '
          f'than the {num_train_steps} train steps.')
    # optax counts decay_steps from step 0, warmup included.
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=o.warmup_steps,
        decay_steps=num_train_steps, end_value=lr * o.end_lr_fraction)
  if o.schedule == 'piecewise':
    return optax.piecewise_constant_schedule(
        lr, {int(b): float(s) for b, s in zip(o.boundaries, o.scales)})
  raise ValueError(f'config.optimizer.schedule={o.schedule!r} is invalid: valid schedules '
                   'are constant, warmup_cosine, piecewise.')


def decay_mask(params: Any) -> Any:
  """True for the leaves that get weight decay: kernels and embeddings, not biases/scales."""
  return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def param_paths(params: Any) -> list[str]:
  """Every leaf's path joined by '/', e.g. 'backbone/Conv_0/kernel', in tree order."""
  return [_path(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]


def under_any(path: str, prefixes: tuple[str, ...]) -> bool:
  """Whether '/'-joined `path` lies under one of `prefixes` (whole components)."""
  return any(_under(path, p) for p in prefixes)


def keep_frozen(new: Any, old: Any, prefixes: tuple[str, ...]) -> Any:
  """`new` with the leaves under `prefixes` taken from `old` (e.g. BatchNorm statistics of
  a frozen backbone, which training mode would otherwise keep updating)."""
  if not prefixes:
    return new
  return jax.tree_util.tree_map_with_path(
      lambda kp, n, o: o if under_any(_path(kp), prefixes) else n, new, old)


def needs_per_example_grads(config: ml_collections.ConfigDict) -> bool:
  """True when the optimizer wants per-example gradients stacked on axis 0 (jax.vmap)."""
  return config.optimizer.name == 'dpsgd'


def _path(key_path: Any) -> str:
  return jax.tree_util.keystr(key_path, simple=True, separator='/')


def _under(path: str, prefix: str) -> bool:
  # Whole path components only: 'Conv_1' must not also freeze 'Conv_10'.
  prefix = prefix.rstrip('/')
  return path == prefix or path.startswith(prefix + '/')


def _freeze_labels(prefixes: tuple[str, ...]) -> Callable[[Any], Any]:
  """Labels each leaf frozen/trainable; a prefix that matches nothing is an error."""

  def labels(tree: Any) -> Any:
    paths = param_paths(tree)
    unmatched = [p for p in prefixes if not any(_under(path, p) for path in paths)]
    if unmatched:
      tops = sorted({path.split('/')[0] for path in paths})
      raise ValueError(
          f'config.freeze={tuple(prefixes)!r} is invalid: {unmatched} match no parameter '
          f'path; paths start with {tops}, e.g. {paths[0]!r}.')
    return jax.tree_util.tree_map_with_path(
        lambda kp, _: _FROZEN if any(_under(_path(kp), p) for p in prefixes) else _TRAINABLE,
        tree)

  return labels


def _zero_per_example() -> optax.GradientTransformation:
  """set_to_zero for per-example grads: drops the leading example axis as well."""
  return optax.stateless(
      lambda updates, params: jax.tree.map(lambda g: jnp.zeros(g.shape[1:], g.dtype), updates))


def _momentum(o: ml_collections.ConfigDict, nesterov: bool = False) -> list[Any]:
  return [optax.trace(decay=o.momentum, nesterov=nesterov)] if o.momentum > 0 else []


# The step direction before weight decay and the lr, for optimizers whose optax alias has
# no weight-decay argument; each is the alias's own chain minus its final lr scaling.
_DIRECTIONS: dict[str, Callable[[ml_collections.ConfigDict], list[Any]]] = {
    'adabelief': lambda c: [optax.scale_by_belief(c.optimizer.b1, c.optimizer.b2,
                                                  c.optimizer.eps)],
    'adagrad': lambda c: [optax.scale_by_rss()],
    'adam': lambda c: [optax.scale_by_adam(c.optimizer.b1, c.optimizer.b2, c.optimizer.eps)],
    'noisy_sgd': lambda c: [optax.add_noise(c.optimizer.noise_eta, gamma=0.55, key=c.seed),
                            *_momentum(c.optimizer)],
    'optimistic_gradient_descent': lambda c: [optax.scale_by_optimistic_gradient()],
    'radam': lambda c: [optax.scale_by_radam(c.optimizer.b1, c.optimizer.b2,
                                             c.optimizer.eps)],
    'rmsprop': lambda c: [optax.scale_by_rms(eps=c.optimizer.eps), *_momentum(c.optimizer)],
    'sgd': lambda c: _momentum(c.optimizer, c.optimizer.nesterov),
    # DP-SGD's aggregation runs first (see make_optimizer); what is left is SGD.
    'dpsgd': lambda c: _momentum(c.optimizer),
    'sm3': lambda c: [optax.scale_by_sm3(c.optimizer.momentum)],
    'yogi': lambda c: [optax.scale_by_yogi(c.optimizer.b1, c.optimizer.b2, c.optimizer.eps)],
}


def _with_own_decay(config: ml_collections.ConfigDict, schedule: optax.Schedule,
                    weight_decay: float) -> optax.GradientTransformation | None:
  """The optimizers that take weight decay (or need their own handling) in optax itself."""
  o = config.optimizer
  if o.name == 'adamw':
    return optax.adamw(schedule, o.b1, o.b2, o.eps, weight_decay=weight_decay,
                       mask=decay_mask)
  if o.name == 'lamb':
    return optax.lamb(schedule, o.b1, o.b2, o.eps, weight_decay=weight_decay,
                      mask=decay_mask)
  if o.name == 'lars':
    # Biases and norm scales also skip the trust ratio (plain lr steps), as in SimCLR.
    return optax.lars(schedule, weight_decay=weight_decay, weight_decay_mask=decay_mask,
                      trust_ratio_mask=decay_mask, momentum=o.momentum, nesterov=o.nesterov)
  if o.name == 'adafactor':
    return optax.adafactor(schedule, weight_decay_rate=weight_decay or None,
                           weight_decay_mask=decay_mask)
  if o.name == 'fromage':
    # fromage's lr also sets its built-in shrinkage, so no decay can go after it.
    decay = [optax.add_decayed_weights(weight_decay, decay_mask)] if weight_decay else []
    return optax.chain(*decay, optax.fromage(schedule))
  return None


VALID_NAMES = tuple(sorted((*_DIRECTIONS, 'adamw', 'lamb', 'lars', 'adafactor', 'fromage')))


def make_optimizer(config: ml_collections.ConfigDict,
                   num_train_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Builds config.optimizer.name with its schedule, clipping, weight decay and freezing.

  Args:
    config: the full config (reads `optimizer.*`, `freeze` and `seed`).
    num_train_steps: optimizer updates in the whole run; the cosine schedule ends there.

  Returns:
    The transformation and the schedule, whose value at the update count is the lr.

  Raises:
    ValueError: an unknown optimizer or schedule name (the message lists the valid ones),
      or a `freeze` prefix that matches no parameter (raised by `tx.init`).
  """
  o = config.optimizer
  if o.name not in VALID_NAMES:
    raise ValueError(f'config.optimizer.name={o.name!r} is invalid: valid names are '
                     f'{", ".join(VALID_NAMES)}.')
  if o.weight_decay_coupled and o.name not in _DIRECTIONS:
    raise ValueError(f'config.optimizer.weight_decay_coupled=True is invalid for '
                     f'optimizer.name={o.name!r}, which applies weight decay itself; valid '
                     f'with: {", ".join(sorted(_DIRECTIONS))}.')
  schedule = make_schedule(config, num_train_steps)
  tx = _with_own_decay(config, schedule, o.weight_decay)
  if tx is None:
    decay = [optax.add_decayed_weights(o.weight_decay, decay_mask)] if o.weight_decay else []
    coupled = o.weight_decay_coupled
    tx = optax.chain(*(decay if coupled else []), *_DIRECTIONS[o.name](config),
                     *([] if coupled else decay), optax.scale_by_learning_rate(schedule))
  if o.clip_grad_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(o.clip_grad_norm), tx)
  if o.name == 'dpsgd':
    # Must see the per-example grads first; it returns their noised mean, so everything
    # after it works on ordinary parameter-shaped updates.
    tx = optax.chain(
        optax.contrib.differentially_private_aggregate(
            o.dp_l2_clip, o.dp_noise_multiplier, key=config.seed),
        tx)
  if config.freeze:
    # Frozen grads never reach the trainable branch, so they neither count towards the
    # clipping norms nor get optimizer state updates.
    zero = _zero_per_example() if needs_per_example_grads(config) else optax.set_to_zero()
    tx = optax.multi_transform({_TRAINABLE: tx, _FROZEN: zero},
                               _freeze_labels(tuple(config.freeze)))
  return tx, schedule
