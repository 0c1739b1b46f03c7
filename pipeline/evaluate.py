"""Exact full-pass evaluation (every example counted once, padding masked out), and the
evaluate mode that scores a saved checkpoint."""

from __future__ import annotations

import json
from typing import Any, Callable, Iterable

from absl import logging
import jax
import numpy as np

from pipeline import checkpoint
from pipeline import config as config_lib
from pipeline import plots
from pipeline import reporting
from pipeline import steps
from pipeline import storage

RESULTS_FILE = 'eval_results.json'
# Keys a command line may set for evaluate and predict modes without --config: their own,
# and those that never change what was trained (where the data lives, the topology).
MODE_KEY_PREFIXES = ('eval.', 'predict.')


def evaluate(eval_step: Callable, state: steps.TrainState, batches: Iterable[dict[str, np.ndarray]],
             parallel: Any, prefix: str = 'eval',
             stop: Callable[[], bool] | None = None) -> dict[str, float] | None:
  """Runs `eval_step` over one pass of `batches` and returns `{prefix}/loss`, `/accuracy`.

  Metrics are merged on device as exact (total, count) pairs, so the result does not
  depend on the batch size, the padding of the last batch or the number of processes.
  With `stop`, the pass is abandoned (None returned) as soon as `stop()` is true between
  batches; the host then stays at most one batch ahead of the devices, so that what is
  abandoned is not left queued on them.
  """
  merged = None
  for batch in batches:
    if stop is not None:
      if stop():
        return None
      jax.block_until_ready(merged)
    metrics = eval_step(state, parallel.shard_batch(batch))
    merged = metrics if merged is None else merged.merge(metrics)
  if merged is None:
    raise ValueError(f'{prefix}: the evaluation split yielded no batches.')
  host = parallel.host_metrics(merged)
  return {f'{prefix}/{name}': float(value) for name, value in host.compute().items()}


def _open(config, workdir: str) -> checkpoint.Checkpointer:
  """The workdir's checkpoints, read-only: a training run may still be writing there."""
  directory = storage.join(workdir, 'checkpoints')
  # Checked first: a mistyped workdir gets this message, not Orbax's.
  if not storage.is_dir(directory):
    raise checkpoint.CheckpointError(
        f'No checkpoint in workdir {workdir}: {directory} does not exist. Train first '
        f'(--mode=train --workdir={workdir}) or pass the workdir of a trained run.')
  ckpt = checkpoint.Checkpointer(directory, config, read_only=True)
  if ckpt.latest_step() is None:
    ckpt.close()
    raise checkpoint.CheckpointError(
        f'No checkpoint in workdir {workdir}: {directory} holds no committed step.')
  return ckpt


def mode_config(workdir: str, command_line, overrides: dict[str, Any],
                config_given: bool):
  """The config evaluate and predict modes run with.

  Without --config it is the config saved with the newest checkpoint of `workdir`, with
  the command line's overrides of the mode's own keys (eval.*, predict.*) and of the keys
  a resume may change (data paths, topology; checkpoint.RESUMABLE_KEYS) applied on top.
  With --config, that config must match the saved one outside those keys.

  Args:
    workdir: the trained run's workdir.
    command_line: the --config value (the schema's defaults when --config is not given).
    overrides: the --config.KEY=VALUE flags given, by KEY.
    config_given: whether --config was given.

  Raises:
    checkpoint.CheckpointError: no checkpoint, an override of a key that would change the
      trained run, or a --config that differs from the saved one.
  """
  ckpt = _open(command_line, workdir)
  try:
    saved = ckpt.saved_meta()['config']
  finally:
    ckpt.close()
  if config_given:
    checkpoint.check_config_change(saved, command_line)
    return command_line
  refused = sorted(k for k in overrides if not k.startswith(MODE_KEY_PREFIXES)
                   and k not in checkpoint.RESUMABLE_KEYS)
  if refused:
    raise checkpoint.CheckpointError(
        f'--config.{refused[0]} would change the run trained in {workdir}: evaluate and '
        'predict use the config saved with its checkpoint, and take overrides only of '
        f'eval.*, predict.* and the keys a resume may change (refused: {", ".join(refused)}). '
        'Pass --config=FILE to give the whole config instead.')
  config = config_lib.from_saved(saved)
  config.update_from_flattened_dict(dict(overrides))
  config.lock()
  return config


def load_checkpoint(config, workdir: str) -> tuple[Any, steps.TrainState, int]:
  """Builds the run's Trainer and restores the checkpoint evaluate and predict modes use.

  That is `config.eval.checkpoint_step`, or for -1 the best checkpoint by
  `config.checkpoint.best_metric` (the newest one when none was saved with metrics).

  Returns:
    (trainer, state in the trainer's parallel layout, step of the checkpoint).

  Raises:
    checkpoint.CheckpointError: the workdir holds no checkpoint, or not the asked step.
  """
  from pipeline import train  # pylint: disable=g-import-not-at-top  # train imports this.
  ckpt = _open(config, workdir)
  try:
    step = config.eval.checkpoint_step
    if step == -1:
      step = ckpt.best_step()  # None: restore() takes the newest usable step.
      if step is None:
        logging.info('No checkpoint was saved with %s; using the newest.',
                     config.checkpoint.best_metric)
    trainer = train.Trainer(config, workdir)
    state, _, _ = ckpt.restore(trainer.abstract_state, step)
  finally:
    ckpt.close()
  state = trainer.parallel.place(state)
  return trainer, state, trainer.parallel.host_step(state)


def evaluate_checkpoint(config, workdir: str) -> dict[str, float]:
  """Evaluate mode: scores the checkpoint of `load_checkpoint` on the eval split, and on
  `config.eval.final_split` if set.

  The metrics go to the log, to the run's metric writers at the checkpoint's step, and to
  WORKDIR/eval_results.json as {"step": N, "eval/loss": ..., ...}.
  """
  trainer, state, step = load_checkpoint(config, workdir)
  metrics = trainer.evaluate(state)
  if config.eval.final_split:
    metrics.update(trainer.evaluate(state, config.eval.final_split))
  logging.info('Checkpoint step %d of %s: %s', step, workdir, metrics)
  lead = jax.process_index() == 0
  writer = reporting.make_writer(workdir, lead=lead)
  writer.write_scalars(step, metrics)
  writer.close()
  if lead:
    # A reader never sees half a file.
    storage.write_text(storage.join(workdir, RESULTS_FILE),
                       json.dumps({'step': step, **metrics}, indent=2))
    plots.plot_learning_curves(workdir)
  return metrics
