"""Train, eval and predict steps: pure functions of (state, batch), no I/O.

No `from __future__ import annotations` here: CLU reads the metric classes from the
annotations of the Collection dataclasses at run time.

`sharding.py` compiles them (jit over a Mesh, or pmap); they only learn the name of the
device axis (`axis_name`), which is None under jit, where arrays are global and XLA inserts
the collectives itself.
"""


import dataclasses
from typing import Any, Callable

from clu import metrics as clu_metrics
import flax
from flax import linen as nn
from flax.training import train_state
import jax
import jax.numpy as jnp
import optax

from pipeline import losses as losses_lib
from pipeline import optim


class TrainState(train_state.TrainState):
  """Flax's TrainState plus BatchNorm statistics and the base rng of the run."""
  batch_stats: Any = None
  rng: jax.Array | None = None  # Raw uint32 key data, so checkpoints hold plain arrays.


def _collection(name: str, metric: str, output: str, *, train: bool) -> type:
  """A CLU Collection of the loss, the task's `metric` (the mean of the step's `output`,
  as `losses.Loss.quality` names it) and, for training, the learning rate and gradient
  norm. CLU reads the metric classes from the annotations, so they are built as such."""
  fields = {'loss': clu_metrics.Average.from_output('loss'),
            metric: clu_metrics.Average.from_output(output)}
  if train:
    fields.update(learning_rate=clu_metrics.LastValue.from_output('learning_rate'),
                  grad_norm=clu_metrics.Average.from_output('grad_norm'))
  return flax.struct.dataclass(type(name, (clu_metrics.Collection,),
                                    {'__annotations__': fields, '__module__': __name__}))


TrainMetrics = _collection('TrainMetrics', 'accuracy', 'correct', train=True)
EvalMetrics = _collection('EvalMetrics', 'accuracy', 'correct', train=False)
# Regression losses report the mean absolute error (over examples and targets) instead.
RegressionTrainMetrics = _collection('RegressionTrainMetrics', 'mae', 'abs_error', train=True)
RegressionEvalMetrics = _collection('RegressionEvalMetrics', 'mae', 'abs_error', train=False)

_METRICS = {losses_lib.CLASSIFICATION: (TrainMetrics, EvalMetrics),
            losses_lib.REGRESSION: (RegressionTrainMetrics, RegressionEvalMetrics)}


def eval_metric_names(prefix: str = 'eval',
                      task: str = losses_lib.CLASSIFICATION) -> tuple[str, ...]:
  """The metrics an evaluation of a split writes (`evaluate.evaluate`), e.g. 'eval/loss':
  the names `checkpoint.best_metric` and `early_stopping.metric` may take."""
  return tuple(f'{prefix}/{field.name}' for field in dataclasses.fields(_METRICS[task][1])
               if not field.name.startswith('_'))  # CLU's own bookkeeping field.


def init_state(model: nn.Module, tx: optax.GradientTransformation, input_shape: tuple[int, ...],
               input_dtype: Any, seed: int, num_outputs: int | None = None) -> TrainState:
  """Initializes params and statistics; called under jit so the result is born sharded.

  With `num_outputs` (the loss's width), a model whose output is not [batch, num_outputs]
  fails here, while the state's shapes are computed, before anything compiles.
  """
  rng = jax.random.PRNGKey(seed)
  params_rng, dropout_rng, rng = jax.random.split(rng, 3)
  example = jnp.zeros((1, *input_shape), input_dtype)
  outputs, variables = model.init_with_output(
      {'params': params_rng, 'dropout': dropout_rng}, example, train=False)
  if num_outputs is not None and outputs.shape != (1, num_outputs):
    raise ValueError(
        f'The model ({type(model).__name__}) returns outputs of shape {outputs.shape} for a '
        f'batch of 1, but config.loss.name needs [batch, {num_outputs}]: '
        'data.num_classes outputs, or 1 for sigmoid_binary_cross_entropy.')
  return TrainState.create(
      apply_fn=model.apply, params=variables['params'], tx=tx,
      batch_stats=variables.get('batch_stats', {}), rng=rng)


def _pmean(tree, axis_name: str | None):
  return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


def _forward(state: TrainState, params, batch_stats, inputs, labels, dropout_rng,
             loss: losses_lib.Loss):
  variables = {'params': params}
  if batch_stats:
    variables['batch_stats'] = batch_stats
  logits, updates = state.apply_fn(variables, inputs, train=True,
                                   rngs={'dropout': dropout_rng}, mutable=['batch_stats'])
  losses = loss.per_example(logits, labels)
  new_stats = updates['batch_stats'] if batch_stats else batch_stats
  return losses.mean(), (losses, logits, new_stats)


def train_step(state: TrainState, batch: dict[str, jax.Array], *, loss: losses_lib.Loss,
               learning_rate_fn: Callable[[jax.Array], jax.Array],
               grad_accum_steps: int = 1, per_example_grads: bool = False,
               frozen: tuple[str, ...] = (), axis_name: str | None = None) -> tuple[TrainState, TrainMetrics]:
  """One optimizer update on `batch`, split into `grad_accum_steps` micro-batches.

  Args:
    state: the current state (donated by the caller).
    batch: {'input': [B, ...], 'label': [B] class ids or [B, targets] floats}.
    loss: the loss (`losses.from_config`); its task picks the metrics.
    learning_rate_fn: the optimizer's schedule, only for reporting.
    grad_accum_steps: micro-batches whose mean gradient makes one update.
    per_example_grads: hand the optimizer [B, ...] gradients (DP-SGD clips each one).
    frozen: path prefixes whose BatchNorm statistics stay fixed (the optimizer already
      gives their parameters zero updates).
    axis_name: the pmap axis to average over; None under jit.

  Returns:
    The new state and this step's metrics.
  """
  # Folding the step into the run's key makes dropout a function of the step alone, so
  # a resumed run draws the same masks as an uninterrupted one.
  step_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  if axis_name is not None:
    step_rng = jax.random.fold_in(step_rng, jax.lax.axis_index(axis_name))
  inputs, labels = batch['input'], batch['label']

  def grads_of(micro_inputs, micro_labels, batch_stats, rng):
    if per_example_grads:
      def one(x, y):
        loss_fn = lambda p: _forward(state, p, batch_stats, x[None], y[None], rng, loss)
        return jax.grad(loss_fn, has_aux=True)(state.params)
      grads, (losses, logits, stats) = jax.vmap(one)(micro_inputs, micro_labels)
      return grads, losses.reshape(-1), logits.reshape(-1, logits.shape[-1]), \
          jax.tree.map(lambda s: s.mean(0), stats)
    loss_fn = lambda p: _forward(state, p, batch_stats, micro_inputs, micro_labels, rng,
                                 loss)
    grads, (losses, logits, stats) = jax.grad(loss_fn, has_aux=True)(state.params)
    return grads, losses, logits, stats

  if grad_accum_steps == 1:
    grads, losses, logits, batch_stats = grads_of(inputs, labels, state.batch_stats, step_rng)
  else:
    # Micro-batch j takes every k-th example, so each one stays spread over all devices.
    k = grad_accum_steps
    split = lambda x: jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

    def accumulate(carry, micro):
      grad_sum, stats = carry
      index, (x, y) = micro
      grads, losses, logits, stats = grads_of(x, y, stats, jax.random.fold_in(step_rng, index))
      return (jax.tree.map(jnp.add, grad_sum, grads), stats), (losses, logits)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    if per_example_grads:
      zeros = jax.tree.map(lambda z: jnp.zeros((inputs.shape[0] // k, *z.shape), z.dtype),
                           state.params)
    (grad_sum, batch_stats), (losses, logits) = jax.lax.scan(
        accumulate, (zeros, state.batch_stats), (jnp.arange(k), (split(inputs), split(labels))))
    grads = jax.tree.map(lambda g: g / k, grad_sum)
    losses, logits = losses.reshape(-1), logits.reshape(-1, logits.shape[-1])
    labels = split(labels).reshape(-1, *labels.shape[1:])

  grads = _pmean(grads, axis_name)
  batch_stats = optim.keep_frozen(_pmean(batch_stats, axis_name), state.batch_stats, frozen)
  mean_grads = jax.tree.map(lambda g: g.mean(0), grads) if per_example_grads else grads
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  metrics = _collect(_METRICS[loss.task][0], axis_name, loss=losses,
                     **loss.quality(logits, labels), learning_rate=learning_rate_fn(state.step),
                     grad_norm=optax.tree.norm(mean_grads))
  return new_state, metrics


def scan_steps(step_fn: Callable, *, unroll: bool = False) -> Callable:
  """`step_fn` (state, batch) -> (state, metrics) made into (state, batches) -> (state,
  metrics): one optimizer step per leading index of `batches`, in order, in one compiled
  call; the metrics of every step stacked on a leading axis. The state is carried, so
  dropout and the schedule see each step's own `state.step` as with separate calls.

  `unroll`: straight-line code instead of a loop. XLA:CPU runs convolutions inside a
  loop body an order of magnitude slower than outside one (jax-ml/jax#12868: 124 vs
  1,924 examples/s for the default CNN on the 2-core CPU), so the CPU unrolls, at the
  price of a compile that grows with the steps per call.
  """
  def steps(state, batches, **kwargs):
    return jax.lax.scan(lambda carry, batch: step_fn(carry, batch, **kwargs), state, batches,
                        unroll=unroll)
  return steps


def indexed_step(step_fn: Callable) -> Callable:
  """`step_fn` (state, batch) -> (state, metrics) made into (state, batches, index): the
  step on `batches[index]`, the stacked batches of a call of several steps."""
  def step(state, batches, index, **kwargs):
    batch = jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, index, keepdims=False),
                         batches)
    return step_fn(state, batch, **kwargs)
  return step


def _collect(collection, axis_name: str | None, **outputs):
  """Metrics over the whole global batch: under pmap they are gathered across devices."""
  # Booleans (`correct`) as float32: CLU sums a bool as int32, and on several devices that
  # sum needs an all-reduce of its own; as float32 it joins the gradients' single one.
  outputs = {k: v.astype(jnp.float32) if getattr(v, 'dtype', None) == jnp.bool_ else v
             for k, v in outputs.items()}  # (A constant learning rate is a Python float.)
  if axis_name is None:
    return collection.single_from_model_output(**outputs)
  return collection.gather_from_model_output(axis_name=axis_name, **outputs)


def _eval_logits(state: TrainState, inputs: jax.Array) -> jax.Array:
  variables = {'params': state.params}
  if state.batch_stats:
    variables['batch_stats'] = state.batch_stats
  return state.apply_fn(variables, inputs, train=False).astype(jnp.float32)


def eval_step(state: TrainState, batch: dict[str, jax.Array], *, loss: losses_lib.Loss,
              axis_name: str | None = None) -> clu_metrics.Collection:
  """Loss and accuracy (or MAE) on `batch`; examples whose `mask` is False count nowhere.

  `loss` is built without label smoothing (`losses.from_config(..., for_eval=True)`):
  smoothing shapes training, not the score.
  """
  logits, labels = _eval_logits(state, batch['input']), batch['label']
  return _collect(_METRICS[loss.task][1], axis_name, loss=loss.per_example(logits, labels),
                  **loss.quality(logits, labels), mask=batch['mask'])


def predict_step(state: TrainState, batch: dict[str, jax.Array], *,
                 loss: losses_lib.Loss) -> jax.Array:
  """Class probabilities (regression: the outputs) for `batch['input']`."""
  return loss.predict(_eval_logits(state, batch['input']))
