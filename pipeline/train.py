"""The training loop: `train_and_evaluate(config, workdir)` returns the final state."""

from __future__ import annotations

import functools
import math
import os
import time
from typing import Any

from absl import logging
from clu import periodic_actions
import jax
import numpy as np

from pipeline import checkpoint
from pipeline import data as data_lib
from pipeline import evaluate as evaluate_lib
from pipeline import models
from pipeline import optim
from pipeline import preemption
from pipeline import reporting
from pipeline import sharding
from pipeline import steps


def num_train_steps(config, train_size: int) -> int:
  """Durations may be given in epochs or steps; they are converted to steps once, here."""
  if config.train.num_epochs:
    return max(1, math.ceil(config.train.num_epochs * train_size
                            / config.train.global_batch_size))
  return config.train.num_steps


def _host_metrics(parallel, metrics: Any, step: int) -> dict[str, float]:
  """Fetches a step's metrics; a non-finite loss stops the run naming the step."""
  values = {f'train/{k}': float(v) for k, v in parallel.host_metrics(metrics).compute().items()}
  if not np.isfinite(values['train/loss']):
    raise FloatingPointError(
        f'Non-finite training loss {values["train/loss"]} at step {step}; stopping. '
        'Lower optimizer.learning_rate or set config.debug_nans=True to find the op.')
  return values


class Trainer:
  """Everything built from the config before the first step: data, model, compiled steps."""

  def __init__(self, config, workdir: str):
    self.config = config
    self.data = data_lib.make_data(config, process_index=jax.process_index(),
                                   process_count=jax.process_count(), workdir=workdir)
    self.num_steps = num_train_steps(config, self.data.train_size)
    tx, self.learning_rate_fn = optim.make_optimizer(config, self.num_steps)
    self.parallel = sharding.make_parallel(config)
    self.model = models.make_model(config, axis_name=self.parallel.axis_name)
    self.init_fn = functools.partial(steps.init_state, self.model, tx, self.data.input_shape,
                                     self.data.input_dtype, config.seed)
    self.abstract_state = self.parallel.abstract_state(self.init_fn)
    num_classes = config.data.num_classes
    self.train_step = self.parallel.compile_train_step(functools.partial(
        steps.train_step, num_classes=num_classes, learning_rate_fn=self.learning_rate_fn,
        label_smoothing=config.optimizer.label_smoothing,
        grad_accum_steps=config.optimizer.grad_accum_steps,
        per_example_grads=optim.needs_per_example_grads(config)), self.abstract_state)
    self.eval_step = self.parallel.compile_eval_step(
        functools.partial(steps.eval_step, num_classes=num_classes), self.abstract_state)

  def evaluate(self, state: steps.TrainState, split: str | None = None) -> dict[str, float]:
    batches = self.data.eval_batches() if split is None else self.data.split_batches(split)
    prefix = 'eval' if split is None else split
    return evaluate_lib.evaluate(self.eval_step, state, batches, self.parallel, prefix)


def restore_or_init(trainer: Trainer, ckpt: checkpoint.Checkpointer):
  """The newest usable checkpoint of this workdir, or a fresh state; and the data iterator."""
  restored = ckpt.restore(trainer.abstract_state)
  if restored is None:
    state = trainer.parallel.init_state(trainer.init_fn)
    return state, trainer.data.train_iter(0)
  state, data_state, meta = restored
  state = trainer.parallel.place(state)
  step = trainer.parallel.host_step(state)
  train_iter = trainer.data.train_iter(step)
  if meta['topology']['process_count'] == jax.process_count():
    # Same process layout: the saved iterator state is exact. Elsewhere the data order,
    # a function of the global step, lets train_iter(step) take over.
    train_iter.set_state(data_state)
  return state, train_iter


def train_and_evaluate(config, workdir: str) -> steps.TrainState:
  """Trains `config` in `workdir`, evaluating every `eval_every_steps` and at the end.

  Rerunning on the same workdir resumes from the newest committed checkpoint.
  """
  trainer = Trainer(config, workdir)
  lead = jax.process_index() == 0
  writer = reporting.make_writer(workdir, lead=lead)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), config)
  state, train_iter = restore_or_init(trainer, ckpt)
  start_step = trainer.parallel.host_step(state)
  logging.info('Training %d steps from step %d (%s).', trainer.num_steps, start_step,
               trainer.parallel.describe())
  stop = preemption.StopRequest(ckpt.reached_preemption)
  report = periodic_actions.ReportProgress(num_train_steps=trainer.num_steps,
                                           writer=writer if lead else None)
  cfg, batch_size = config.train, config.train.global_batch_size
  window, pending, stopping = [], None, False
  data_wait, window_start = 0.0, time.perf_counter()

  for step in range(start_step + 1, trainer.num_steps + 1):  # `step` = updates done after it.
    fetch_start = time.perf_counter()
    batch = trainer.parallel.shard_batch(next(train_iter))
    data_wait += time.perf_counter() - fetch_start
    state, metrics = trainer.train_step(state, batch)
    # Read the previous step's metrics only now, after this step is dispatched: the host
    # never waits for the device, and at most two steps are ever in flight.
    if pending is not None:
      window.append(_host_metrics(trainer.parallel, *pending))
    pending = (metrics, step)
    report(step)
    last, stopping = step == trainer.num_steps, stop.should_stop(step)
    eval_metrics = None
    if step % cfg.log_every_steps == 0 or last or stopping:
      window.append(_host_metrics(trainer.parallel, *pending))
      pending = None
      elapsed = time.perf_counter() - window_start
      scalars = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
      scalars['train/learning_rate'] = window[-1]['train/learning_rate']
      scalars['perf/examples_per_sec'] = len(window) * batch_size / elapsed
      scalars['perf/data_wait_fraction'] = data_wait / elapsed
      writer.write_scalars(step, scalars)
      window, data_wait, window_start = [], 0.0, time.perf_counter()
    if step % cfg.eval_every_steps == 0 or last:
      eval_metrics = trainer.evaluate(state)
      writer.write_scalars(step, eval_metrics)
      logging.info('step %d: %s', step, eval_metrics)
      window_start = time.perf_counter()  # Eval time is not training throughput.
    if step % config.checkpoint.every_steps == 0 or last or stopping or eval_metrics:
      if pending is not None:  # Never write a checkpoint of a state whose loss is not finite.
        window.append(_host_metrics(trainer.parallel, *pending))
        pending = None
      ckpt.save(step, trainer.parallel.for_saving(state), train_iter.get_state(), {},
                eval_metrics)
    if stopping:
      logging.warning('Stop requested (%s) at step %d: checkpoint saved, exiting.',
                      stop.signal_name or 'preemption notice', step)
      break

  ckpt.wait_until_finished()
  stop.restore()
  if config.eval.final_split and not stopping:
    # The final split scores the model chosen on the eval split; it never steers training.
    best_step = ckpt.best_step()
    best_state = trainer.parallel.place(ckpt.restore(trainer.abstract_state, best_step)[0])
    final = trainer.evaluate(best_state, config.eval.final_split)
    writer.write_scalars(trainer.num_steps, {**final, 'best_step': best_step})
    logging.info('Model of step %d (best %s on %s) on %s: %s', best_step,
                 config.checkpoint.best_metric, config.data.eval_split,
                 config.eval.final_split, final)
  ckpt.close()
  writer.flush()
  return state
