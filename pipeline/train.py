"""The training loop: `train_and_evaluate(config, workdir)` returns the final state."""

from __future__ import annotations

import collections
import functools
import math
import time
from typing import Any

from absl import logging
from clu import periodic_actions
import jax
import jax.numpy as jnp
import numpy as np

from pipeline import checkpoint
from pipeline import data as data_lib
from pipeline import evaluate as evaluate_lib
from pipeline import exits
from pipeline import goodput
from pipeline import ledger as ledger_lib
from pipeline import losses
from pipeline import models
from pipeline import optim
from pipeline import plots
from pipeline import preemption
from pipeline import prefetch
from pipeline import reporting
from pipeline import sharding
from pipeline import steps
from pipeline import storage
from pipeline import summaries
from pipeline import watchdog


def num_train_steps(config, train_size: int) -> int:
  """Durations may be given in epochs or steps; they are converted to steps once, here."""
  if config.train.num_epochs:
    return max(1, math.ceil(config.train.num_epochs * train_size
                            / config.train.global_batch_size))
  return config.train.num_steps


def dispatches_steps() -> bool:
  """Whether a call of several steps dispatches them one by one (see Trainer)."""
  return jax.default_backend() == 'cpu' and jax.local_device_count() > 1


def _host_metrics(parallel, window: list[tuple[list[int], Any]],
                  scanned: bool) -> list[dict[str, float]]:
  """Fetches the metrics of a window of calls at once; a non-finite loss stops the run,
  naming the first step that had one."""
  window_steps = [step for steps_of_call, _ in window for step in steps_of_call]
  # One transfer per metric field, not one per field per step: the steps' fields are
  # joined on the devices along a last axis (after pmap's leading device axis). A scanned
  # call of several steps (`scanned`) already has one: the scan's, after pmap's device axis.
  join = ((lambda *xs: jnp.concatenate(xs, axis=-1)) if scanned
          else (lambda *xs: jnp.stack(xs, axis=-1)))
  fetched = parallel.host_metrics(jax.tree.map(join, *[m for _, m in window]))
  # Each metric's own compute() (Average: total / count) works elementwise on the joined
  # fields; the Collection's compute() would refuse the joined reduction counter.
  values = {f'train/{k}': np.asarray(metric.compute(), np.float64)
            for k, metric in vars(fetched).items() if not k.startswith('_')}
  bad = np.flatnonzero(~np.isfinite(values['train/loss']))
  if bad.size:
    raise FloatingPointError(
        f'Non-finite training loss {values["train/loss"][bad[0]]} at step '
        f'{window_steps[bad[0]]}; stopping. Lower optimizer.learning_rate or set '
        'config.debug_nans=True to find the op.')
  return [{'step': step, **{k: float(v[i]) for k, v in values.items()}}
          for i, step in enumerate(window_steps)]


def _skipped_scalars(config, trainer: 'Trainer', train_iter) -> dict[str, float]:
  """data/skipped under data.on_bad_record='skip': records dropped at start-up plus the
  unreadable files this process's train stream stepped over (counted since this start)."""
  if config.data.on_bad_record != 'skip':
    return {}
  return {'data/skipped': float(trainer.data.skipped + train_iter.skipped)}


class Trainer:
  """Everything built from the config before the first step: data, model, compiled steps."""

  def __init__(self, config, workdir: str, schedule_steps: int | None = None):
    """`schedule_steps`: the length the learning-rate schedule was built for when the run
    started (checkpoint meta); None for a fresh run, whose schedule spans its duration."""
    self.config = config
    self.watchdog = watchdog.Watchdog(0)  # Off; the training loop sets its own.
    self.data = data_lib.make_data(config, process_index=jax.process_index(),
                                   process_count=jax.process_count(), workdir=workdir)
    self.num_steps = num_train_steps(config, self.data.train_size)
    self.schedule_steps = schedule_steps or self.num_steps
    if self.schedule_steps != self.num_steps:
      # The duration may change on resume (checkpoint.RESUMABLE_KEYS); a schedule rebuilt
      # for the new length would make the learning rate jump at the resumed step.
      logging.warning(
          'Training now lasts %d steps, but the learning-rate schedule keeps the %d steps '
          'the run started with%s.', self.num_steps, self.schedule_steps,
          f'; steps after {self.schedule_steps} train at its final value'
          if self.num_steps > self.schedule_steps else '')
    tx, self.learning_rate_fn = optim.make_optimizer(config, self.schedule_steps)
    self.parallel = sharding.make_parallel(config)
    self.model = models.make_model(config, axis_name=self.parallel.axis_name)
    self.loss = losses.from_config(config)
    # Decoded images arrive as uint8: the state's apply_fn normalizes them on the device.
    self.init_fn = functools.partial(steps.init_state, self.data.on_device(self.model), tx,
                                     self.data.input_shape, self.data.input_dtype,
                                     config.seed, self.loss.num_outputs)
    self.abstract_state = self.parallel.abstract_state(self.init_fn)
    eval_loss = losses.from_config(config, for_eval=True)
    step_fn = functools.partial(
        steps.train_step, loss=self.loss, learning_rate_fn=self.learning_rate_fn,
        grad_accum_steps=config.optimizer.grad_accum_steps,
        per_example_grads=optim.needs_per_example_grads(config),
        frozen=tuple(config.freeze))
    # With steps_per_call > 1 every call, a shorter one too, takes stacked batches. An
    # accelerator or one CPU device runs them in one compiled call (a scan; unrolled on
    # the CPU, see steps.scan_steps). Several CPU devices in a process dispatch the call's
    # steps one by one on its stacked batches instead: there, measured, the unrolled call
    # slows with its length (the default CNN on 8 fake devices, the step alone: K = 8
    # 1,660 examples/s against K = 1 2,040), while dispatching keeps the step's speed and
    # still stacks, transfers and checks K steps at a time (bench/peers.py, README).
    self.stacked = config.train.steps_per_call > 1
    self.dispatched = self.stacked and dispatches_steps()
    self.unrolled = self.stacked and not self.dispatched and jax.default_backend() == 'cpu'
    if self.dispatched:
      logging.info('Calls of %d steps dispatch their steps one by one (%d CPU devices in '
                   'this process).', config.train.steps_per_call, jax.local_device_count())
      fn = steps.indexed_step(step_fn)
    else:
      fn = steps.scan_steps(step_fn, unroll=self.unrolled) if self.stacked else step_fn
    self.train_fn = self.parallel.compile_train_step(fn, self.abstract_state,
                                                     stacked=self.stacked,
                                                     indexed=self.dispatched)
    self._executables: dict[int, Any] = {}  # Steps per call -> its compiled executable.
    self._indices: list[jax.Array] = []
    self._in_flight: collections.deque[Any] = collections.deque()  # Dispatched steps' metrics.
    self.eval_step = self.parallel.compile_eval_step(
        functools.partial(steps.eval_step, loss=eval_loss), self.abstract_state)
    self.predict_step = self.parallel.compile_predict_step(
        functools.partial(steps.predict_step, loss=eval_loss), self.abstract_state)

  def call_length(self, step: int) -> int:
    """Steps the call after `step` runs: `train.steps_per_call`, or fewer so that calls
    end at every eval step, checkpoint step and the last step."""
    cfg = self.config
    return min(cfg.train.steps_per_call, self.num_steps - step,
               *(every - step % every for every in (cfg.train.eval_every_steps,
                                                     cfg.checkpoint.every_steps)))

  def needs_compile(self, length: int) -> bool:
    return length not in self._executables

  def compile_train_step(self, state: steps.TrainState, batch: Any, length: int) -> float:
    """Compiles the call of `length` steps for these shapes ahead of time; returns the
    model FLOPs of one step. Calling the executable can never retrace or recompile.
    """
    lowered = self.train_fn.lower(state, batch, *self._index_args(1))
    compiled = lowered.compile()
    self._executables[length] = self.parallel.executable(compiled)
    # FLOPs of the lowered module: on GPU the compiled one hides convolutions in cuDNN
    # custom calls that its cost analysis does not count. XLA counts a loop's body once,
    # so a scan of several steps costs one step's FLOPs; unrolled, it counts every step.
    cost = lowered.cost_analysis() or compiled.cost_analysis()  # None on some GPUs.
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get('flops', 0.0)) / (length if self.unrolled else 1)

  def _index_args(self, length: int) -> list[jax.Array]:
    """The step indices a dispatched call passes, on the devices once (none otherwise)."""
    if not self.dispatched:
      return []
    if len(self._indices) < length:
      self._indices = [self.parallel.step_index(i) for i in range(length)]
    return self._indices[:length]

  def train_step(self, state: steps.TrainState, batch: Any, length: int):
    """`length` optimizer steps on `batch` (stacked when `self.stacked`); the metrics of
    the call, or when `self.dispatched` a list of each step's."""
    run = self._executables[length]
    if not self.dispatched:
      return run(state, batch)
    metrics = []
    for index in self._index_args(length):
      # As TrainWindow.push bounds the calls in flight, since each step is one here.
      if len(self._in_flight) >= TrainWindow.IN_FLIGHT:
        jax.block_until_ready(self._in_flight.popleft())
      state, step_metrics = run(state, batch, index)
      self._in_flight.append(step_metrics)
      metrics.append(step_metrics)
    return state, metrics

  def evaluate(self, state: steps.TrainState, split: str | None = None,
               stop=None) -> dict[str, float] | None:
    """The metrics of one pass over `split` (default: the eval split); None if `stop()`
    turned true between its batches."""
    batches = self.data.eval_batches() if split is None else self.data.split_batches(split)
    prefix = 'eval' if split is None else split
    batches = self.watchdog.watch(batches, prefix)
    return evaluate_lib.evaluate(self.eval_step, state, batches, self.parallel, prefix,
                                 stop=stop)


def restore_or_init(trainer: Trainer, ckpt: checkpoint.Checkpointer):
  """The newest usable checkpoint of this workdir, or a fresh state (optionally from
  `config.init_from`); the data iterator positioned after it; the saved metadata."""
  restored = ckpt.restore(trainer.abstract_state)
  if restored is None:
    state = trainer.parallel.init_state(trainer.init_fn)
    if trainer.config.init_from:
      loaded = checkpoint.init_from(trainer.config, trainer.parallel.for_saving(state))
      state = trainer.parallel.place(jax.tree.map(
          lambda x, a: jax.device_put(x, a.sharding), loaded, trainer.abstract_state))
    return state, trainer.data.train_iter(0), {}
  state, data_state, meta = restored
  state = trainer.parallel.place(state)
  step = trainer.parallel.host_step(state)
  train_iter = trainer.data.train_iter(step)
  if meta['topology']['process_count'] == jax.process_count():
    # Same process layout: the saved iterator state is exact. Elsewhere the data order,
    # a function of the global step, lets train_iter(step) take over.
    train_iter.set_state(data_state)
  return state, train_iter, meta


class EarlyStopping:
  """Stops after `patience` evals without a `min_delta` improvement of the metric.

  Its state goes into every checkpoint's metadata (`state()`, `restore()`), so a resumed
  run counts the evals before the interruption, and an early-stopped run stays stopped.
  """

  def __init__(self, config):
    self.config = config.early_stopping
    self.best, self.bad_evals = None, 0

  def update(self, metrics: dict[str, float]) -> bool:
    if not self.config.metric:
      return False
    value = metrics[self.config.metric]
    sign = 1 if self.config.mode == 'max' else -1
    if self.best is None or sign * (value - self.best) > self.config.min_delta:
      self.best, self.bad_evals = value, 0
    else:
      self.bad_evals += 1
    return self.stopped

  @property
  def stopped(self) -> bool:
    """Whether the run has had its `patience` (as configured now: it may be raised on a
    resume to continue an early-stopped run) of evals without improvement."""
    return bool(self.config.metric) and self.bad_evals >= self.config.patience

  def state(self) -> dict[str, Any]:
    return {'best': self.best, 'bad_evals': self.bad_evals}

  def restore(self, saved: dict[str, Any] | None) -> None:
    """Continues from a checkpoint's `state()`; None (a fresh run) keeps the initial one."""
    if saved:
      self.best, self.bad_evals = saved['best'], saved['bad_evals']


def _lost_steps(workdir: str, restored_step: int) -> int:
  """Steps the previous attempt logged past the checkpoint it is resumed from."""
  if not reporting.has_jsonl(workdir):
    return 0
  logged = [r['step'] for r in reporting.read_jsonl(workdir) if 'train/loss' in r]
  return max(0, max(logged, default=0) - restored_step)


def _write_start_summaries(trainer: Trainer, writer, step: int) -> None:
  config = trainer.config
  writer.write_texts(step, {'config': summaries.config_text(config), 'model': summaries.model_summary(
      trainer.model, trainer.data.input_shape, trainer.data.input_dtype)})
  if len(trainer.data.input_shape) == 3:  # Image workloads: what the model really sees.
    batch = next(iter(trainer.data.train_iter(step)))
    writer.write_images(step, {'train/inputs': summaries.image_grid(batch['input'])})


def _evaluate(trainer: Trainer, state, writer, step: int, lead: bool,
              stop=None) -> dict[str, float] | None:
  metrics = trainer.evaluate(state, stop=stop)
  if metrics is None:
    logging.warning('Stop requested during the eval of step %d: eval abandoned.', step)
    return None
  writer.write_scalars(step, metrics)
  logging.info('step %d: %s', step, metrics)
  if len(trainer.data.input_shape) == 3 and trainer.loss.task == losses.CLASSIFICATION:
    # Every process runs the step (it spans all devices); only the lead writes the grid.
    batch = next(iter(trainer.data.eval_batches()))
    probs = trainer.parallel.host_outputs(
        trainer.predict_step(state, trainer.parallel.shard_batch(batch)))
    wrong = summaries.misclassified(batch['input'], batch['label'],
                                    probs[:len(batch['label'])].argmax(-1), batch['mask'])
    if lead and wrong is not None:
      writer.write_images(step, {'eval/misclassified': summaries.image_grid(wrong[0])})
  return metrics


class TrainWindow:
  """Train metrics of the steps since the last write, left on the devices until then.

  A fetch per step makes the host wait for every step, and on an accelerator the wait and
  the transfers cost more than a small model's step (bench/gpu_loops.py). `push` only
  waits for the call `IN_FLIGHT` back, so the host stays that far ahead and no further
  (about 30 queued executions with collectives aborted XLA's CPU rendezvous; a dispatched
  call's steps are bounded alike in Trainer.train_step); `drain` fetches the window in
  one transfer and checks the losses.
  """
  IN_FLIGHT = 3

  def __init__(self, trainer: Trainer, clock: goodput.Goodput, now=time.perf_counter):
    self.trainer, self.clock, self.now = trainer, clock, now
    self.records, self.pending, self.flops = [], [], 0.0
    self.step_seconds = 0.0
    self.restart()

  def restart(self) -> None:
    """Restarts the clock (after a compile or an eval): throughput counts only the steps
    pushed since; the metric means still cover every step since the last write."""
    self.start, self.wait_start = self.now(), self.clock.seconds['data_wait']
    self.timed_steps = 0

  def push(self, metrics: Any, steps_of_call: list[int]) -> None:
    """The metrics of one call, which ran `steps_of_call`."""
    if self.trainer.dispatched:  # One entry per step, as calls of one step make.
      self.pending.extend(([step], m) for step, m in zip(steps_of_call, metrics))
    else:
      self.pending.append((steps_of_call, metrics))
    self.timed_steps += len(steps_of_call)
    if len(self.pending) > self.IN_FLIGHT:
      jax.block_until_ready(self.pending[-self.IN_FLIGHT - 1][1])

  def drain(self) -> None:
    """Fetches the pending steps' metrics now (a non-finite loss raises here)."""
    if self.pending:
      self.records.extend(_host_metrics(self.trainer.parallel, self.pending,
                                        self.trainer.stacked and not self.trainer.dispatched))
      self.pending = []

  def flush(self, upto: int) -> dict[str, float]:
    """Means over the window's steps up to `upto`, plus throughput (of the whole window);
    `restart` begins the next window once every step in it is written."""
    self.drain()
    elapsed = self.now() - self.start
    self.step_seconds = elapsed / max(1, self.timed_steps)
    written = [r for r in self.records if r['step'] <= upto]
    self.records = [r for r in self.records if r['step'] > upto]
    scalars = {k: float(np.mean([r[k] for r in written])) for k in written[0] if k != 'step'}
    scalars.update({
        'train/learning_rate': written[-1]['train/learning_rate'],
        'perf/examples_per_sec': self.trainer.config.train.global_batch_size
                                 / self.step_seconds,
        'perf/flops_per_sec': self.flops / self.step_seconds,
        'perf/data_wait_fraction':
            (self.clock.seconds['data_wait'] - self.wait_start) / elapsed})
    return scalars


def _hooks(config, trainer: Trainer, writer, workdir: str) -> list[Any]:
  """Progress (steps/s, ETA) and the optional profile window; starts a profiler server."""
  hooks = [periodic_actions.ReportProgress(num_train_steps=trainer.num_steps, writer=writer)]
  if config.profile.start_step >= 0:
    # Steps only: CLU's default also waits 3 s, which a fast run may never reach.
    hooks.append(periodic_actions.Profile(
        logdir=workdir, first_profile=config.profile.start_step,
        num_profile_steps=config.profile.num_steps, profile_duration_ms=None,
        every_secs=None))
  if config.profile.server_port:
    jax.profiler.start_server(config.profile.server_port)
  return hooks


def _compile(trainer: Trainer, window: TrainWindow, clock: goodput.Goodput, dog, state,
             batch, length: int, step: int) -> None:
  """Compiles the call of `length` steps (once per length), timed as compile time."""
  dog.progress('compile', step)
  compile_start = time.perf_counter()
  window.flops = trainer.compile_train_step(state, batch, length)
  compile_seconds = time.perf_counter() - compile_start
  clock.add('compile', compile_seconds)
  logging.info('Train call of %d step(s) compiled in %.2f s (%.3g FLOPs/step).', length,
               compile_seconds, window.flops)
  window.restart()
  dog.progress('train', step)


def train_and_evaluate(config, workdir: str) -> steps.TrainState:
  """Trains `config` in `workdir` under the stall watchdog (`config.watchdog`)."""
  # Closed however the loop ends: a caller's process (a test, a notebook) lives on.
  with watchdog.Watchdog.from_config(config) as dog:
    return _train_and_evaluate(config, workdir, dog)


def _train_and_evaluate(config, workdir: str, dog: watchdog.Watchdog) -> steps.TrainState:
  """Trains `config` in `workdir`, evaluating every `eval_every_steps` and at the end.

  Rerunning on the same workdir resumes from the newest committed checkpoint.
  """
  clock = goodput.Goodput()
  # First, so that a stop during start-up exits cleanly (checked after the restore and
  # the compile).
  stop = preemption.StopRequest()
  ckpt = checkpoint.Checkpointer(storage.join(workdir, 'checkpoints'), config)
  trainer = Trainer(config, workdir, ckpt.newest_meta().get('schedule_steps'))
  trainer.watchdog = dog
  lead = jax.process_index() == 0
  writer = reporting.make_writer(workdir, lead=lead)
  dog.progress('restore', 0)
  with clock.timing('restore'):
    state, train_iter, meta = restore_or_init(trainer, ckpt)
  logging.info('Restore or init took %.2f s.', clock.seconds['restore'])
  start_step = trainer.parallel.host_step(state)
  early = EarlyStopping(config)
  early.restore(meta.get('early_stopping'))
  # A stop during the restore (nothing trained, nothing to save), or a rerun of an
  # early-stopped workdir (a retried job), which must not train on past its stop.
  not_training = (
      f'Stop requested ({stop.reason}) during start-up: exiting, nothing saved.'
      if stop.requested() else
      f'The run in {workdir} stopped early at step {start_step} '
      f'({config.early_stopping.metric}: {early.bad_evals} evals without an improvement '
      f'of {config.early_stopping.min_delta:g} over {early.best}, patience '
      f'{config.early_stopping.patience}); not training further. Raise '
      'early_stopping.patience to continue it.' if early.stopped else None)
  if not_training:
    logging.warning('%s', not_training)
    stop.restore()
    ckpt.close()
    writer.close()
    return state
  if meta.get('eval_pending'):  # A stop abandoned this step's eval; it runs now.
    early.update(_evaluate(trainer, state, writer, start_step, lead))
  clock.resume(meta.get('goodput', {}))
  lost_steps = _lost_steps(workdir, start_step)
  clock.add('lost_to_preemption', meta.get('step_seconds', 0.0) * lost_steps)
  logging.info('Training %d steps from step %d (%s).', trainer.num_steps, start_step,
               trainer.parallel.describe())
  if lead:
    _write_start_summaries(trainer, writer, start_step)
  hooks = _hooks(config, trainer, writer if lead else None, workdir)
  window, cfg, stopping = TrainWindow(trainer, clock), config.train, False

  ledger = ledger_lib.Ledger(trainer.data, workdir, start_step,
                             global_batch_size=cfg.global_batch_size,
                             process_index=jax.process_index(),
                             process_count=jax.process_count())
  put = functools.partial(trainer.parallel.shard_batch, stacked=trainer.stacked)
  batches = prefetch.DevicePrefetch(train_iter, ledger.device_put(put),
                                    config.data.device_prefetch,
                                    trainer.call_length if trainer.stacked else None)

  # An exception (a non-finite loss, a crash) first lets a started save commit.
  with exits.keep_started_save(ckpt, config.checkpoint.exit_wait_s, batches.close,
                               ledger.close, stop.restore):
    step = start_step  # Updates done; each call runs `length` more.
    while step < trainer.num_steps:
      length, first = trainer.call_length(step), step == start_step
      dog.progress('data', step + 1)
      with clock.timing('data_wait'):
        batch = next(batches)
      dog.progress('train', step + 1)
      # A stop during start-up need not wait for a compile.
      if trainer.needs_compile(length) and not (first and stop.requested()):
        _compile(trainer, window, clock, dog, state, batch, length, step + 1)
      if first and stop.requested():  # Still start-up: nothing trained since the restore.
        logging.warning('Stop requested (%s) during start-up: exiting, nothing saved.',
                        stop.reason)
        stopping = True
        break
      state, metrics = trainer.train_step(state, batch, length)
      done = range(step + 1, step + length + 1)
      for step in done:
        ledger.record(step)
        for hook in hooks:
          hook(step)
      window.push(metrics, list(done))
      last, stopping = step == trainer.num_steps, stop.should_stop(step)
      logged = [s for s in done if s % cfg.log_every_steps == 0 or
                s == step and (last or stopping)]
      for logged_step in logged:  # Each as if written after its own step.
        writer.write_scalars(logged_step, {**window.flush(logged_step), **clock.scalars(),
                                           **_skipped_scalars(config, trainer, train_iter)})
      if logged:
        window.restart()
      eval_metrics, eval_pending = None, False
      if step % cfg.eval_every_steps == 0 or last:
        window.drain()  # A non-finite loss stops here, before an eval of a broken state.
        eval_metrics = _evaluate(trainer, state, writer, step, lead,
                                 stop.requested if stop.acts_alone else None)
        eval_pending = eval_metrics is None  # Abandoned for a stop: saved now, run on resume.
        stopping = eval_pending or early.update(eval_metrics) or stopping
        window.restart()  # Eval time is not training throughput.
      if step % config.checkpoint.every_steps == 0 or last or stopping or eval_metrics:
        window.drain()  # Never write a checkpoint of a state whose loss is not finite.
        dog.progress('checkpoint', step)
        with clock.timing('checkpoint'):
          ckpt.save(step, trainer.parallel.for_saving(state), batches.get_state(),
                    {'goodput': clock.state(), 'step_seconds': window.step_seconds,
                     'early_stopping': early.state(),
                     'schedule_steps': trainer.schedule_steps,
                     'eval_pending': eval_pending},
                    eval_metrics)
      if stopping:
        logging.warning('Stop requested (%s) at step %d: checkpoint saved, exiting.',
                        'early stopping' if early.stopped and not stop.received
                        else stop.reason, step)
        break

  dog.progress('checkpoint_wait', dog.step)
  ckpt.wait_until_finished()
  batches.close()
  ledger.close()
  stop.restore()
  if config.eval.final_split and (not stopping or early.stopped):
    _evaluate_final_split(trainer, ckpt, writer)
  if lead:
    reporting.write_session(workdir, *summaries.hparams_session(
        config, workdir, finished=not stopping or early.stopped))
    writer.flush()
    plots.plot_learning_curves(workdir)
  ckpt.close()
  writer.close()
  return state


def _evaluate_final_split(trainer: Trainer, ckpt: checkpoint.Checkpointer, writer) -> None:
  """Scores the model chosen on the eval split on the final split, which never steers."""
  config = trainer.config
  best_step = ckpt.best_step()
  best_state = trainer.parallel.place(ckpt.restore(trainer.abstract_state, best_step)[0])
  final = trainer.evaluate(best_state, config.eval.final_split)
  writer.write_scalars(trainer.num_steps, {**final, 'best_step': best_step})
  logging.info('Model of step %d (best %s on %s) on %s: %s', best_step,
               config.checkpoint.best_metric, config.data.eval_split,
               config.eval.final_split, final)
