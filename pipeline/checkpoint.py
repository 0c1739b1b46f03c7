"""Orbax checkpoints: async saves, keep newest N plus the best, exact and elastic resume.

One checkpoint step holds everything needed to continue: the train state (params,
optimizer state, BatchNorm statistics, step, rng), the data iterator state, and metadata
(the config as JSON, the topology it was saved on, the text vocabulary if any). Orbax
writes each step into a temporary directory and renames it on commit, so a step that was
interrupted mid-write is never listed, never restored. Nothing here loads a pickle.
"""

from __future__ import annotations

from concurrent import futures
import contextlib
import json
import os
import time
from typing import Any

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from pipeline import exits
from pipeline import multihost
from pipeline import optim
from pipeline import storage

# Keys that may change between a run and its resume without --config.checkpoint.
# allow_config_change: durations, cadences, logging, and the topology (elastic resume).
RESUMABLE_KEYS = (
    'train.num_steps', 'train.num_epochs', 'train.log_every_steps', 'train.eval_every_steps',
    'train.steps_per_call',
    'checkpoint.every_steps', 'checkpoint.max_to_keep', 'checkpoint.async_save',
    'checkpoint.device_snapshot', 'checkpoint.exit_wait_s',
    'checkpoint.allow_config_change', 'eval.batch_size', 'eval.checkpoint_step',
    'mesh.data', 'mesh.fsdp', 'mesh.dcn_data', 'parallelism', 'fsdp', 'fsdp_min_size',
    'data.num_workers',
    'data.prefetch_threads', 'data.device_prefetch', 'debug_nans', 'data.path', 'data.eval_path',
    'data.tfds_data_dir', 'predict.input', 'predict.output', 'predict.batch_size',
    'early_stopping.patience', 'early_stopping.min_delta', 'profile.start_step',
    'profile.num_steps', 'profile.server_port', 'eval.final_split', 'watchdog.timeout_s')


class CheckpointError(RuntimeError):
  """No usable checkpoint, or a resume that would silently change the run."""


class SaveError(CheckpointError):
  """A save failed or did not commit; the run exits with exits.SAVE_LOST."""
  exit_code = exits.SAVE_LOST


# Status codes leading tensorstore's ValueErrors that say a step's files are missing or
# damaged (NOT_FOUND: a chunk is gone; DATA_LOSS: it fails its checks; OUT_OF_RANGE: it
# is shorter than its index says). UNAVAILABLE, RESOURCE_EXHAUSTED and the rest are not.
_UNREADABLE_STATUS = ('NOT_FOUND:', 'DATA_LOSS:', 'OUT_OF_RANGE:')
# How tensorstore reports zstd failing on a value or a B-tree node of OCDBT: with the
# FAILED_PRECONDITION status for a value, without a status for a node, so matched inside.
_ZSTD_FAILED = 'ZSTD_decompressStream() failed: '


# How much of an error's message a process offers the lead (the key-value store's
# values are small; the local process keeps its whole exception as the cause).
_OFFER_CHARS = 2000


def _first_failure(offers: list[str]) -> str:
  """The lead's choice over every process's `_offer` of a step: a changed config, then
  an error, then unreadable data, in process order; 'ok' only if all read it."""
  for kind in ('config', 'error', 'unreadable'):
    for offer in offers:
      if offer.startswith(kind + ' '):
        return offer
  return 'ok'


def _unreadable(error: BaseException) -> bool:
  """Whether `error` of restoring a step says its data cannot be read back as saved.

  Only then may `restore` fall back to an older step. A transient I/O error, an
  out-of-memory or a shape/sharding mismatch would recur or go away on a rerun; treating
  it as corruption would silently drop training and set a good step aside.
  """
  if isinstance(error, (json.JSONDecodeError, FileNotFoundError)):
    return True  # A truncated JSON file (metadata, data, meta), or a missing one.
  if isinstance(error, KeyError) and 'was not found in the checkpoint' in str(error):
    return True  # Orbax: a whole item directory of the step is missing.
  if isinstance(error, ValueError) and str(error).startswith(_UNREADABLE_STATUS):
    return True
  if isinstance(error, ValueError) and _ZSTD_FAILED in str(error):
    # A compressed value or B-tree node that fails to decode: a bad frame header ("Unknown
    # frame descriptor"), block or checksum. Running out of memory doing so is not damage.
    return 'Allocation error' not in str(error)
  return error.__cause__ is not None and _unreadable(error.__cause__)


# One dispatched computation that copies the state on its devices, keeping its sharding.
# `jnp.copy` is a real copy under jit (an output never aliases an undonated input).
_device_copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))


def _flatten(tree: dict[str, Any], prefix: str = '', sep: str = '/') -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}{sep}', sep))
    else:
      flat[f'{prefix}{key}'] = list(value) if isinstance(value, tuple) else value
  return flat


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return json.loads(config.to_json())


def check_config_change(saved: dict[str, Any], config: ml_collections.ConfigDict) -> None:
  """Raises listing every changed key outside RESUMABLE_KEYS, unless allowed."""
  old, new = _flatten(saved, sep='.'), _flatten(config_to_dict(config), sep='.')
  changed = sorted(k for k in old.keys() | new.keys()
                   if old.get(k) != new.get(k) and k not in RESUMABLE_KEYS)
  if changed and not config.checkpoint.allow_config_change:
    lines = '\n'.join(f'  {k}: {old.get(k)!r} -> {new.get(k)!r}' for k in changed)
    raise CheckpointError(
        f'The config differs from the checkpoint in keys that change the run:\n{lines}\n'
        'Resume with the saved values, use a new --workdir, or pass '
        '--config.checkpoint.allow_config_change=True to continue deliberately.')


class Checkpointer:
  """The run's CheckpointManager in WORKDIR/checkpoints.

  `read_only=True` (evaluate and predict modes) never creates, deletes or renames
  anything there: a training run may still be writing to the same directory, and its
  temporary step directories are its own.
  """

  def __init__(self, directory: str, config: ml_collections.ConfigDict, *,
               read_only: bool = False):
    self.config = config
    self.read_only = read_only
    self.directory = os.path.abspath(directory) if storage.is_local(directory) else directory
    best_metric = config.checkpoint.best_metric
    preservation = ocp.checkpoint_managers.AnyPreservationPolicy([
        ocp.checkpoint_managers.LatestN(n=config.checkpoint.max_to_keep),
        ocp.checkpoint_managers.BestN(
            get_metric_fn=lambda metrics: metrics[best_metric],
            reverse=config.checkpoint.best_mode == 'min', n=1,
            keep_checkpoints_without_metrics=False),
    ])
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            preservation_policy=preservation, best_fn=lambda m: m[best_metric],
            best_mode=config.checkpoint.best_mode,
            enable_async_checkpointing=config.checkpoint.async_save and not read_only,
            cleanup_tmp_directories=not read_only, create=not read_only,
            read_only=read_only),
        item_names=('state', 'data', 'meta'))
    self._reader = ocp.CompositeCheckpointHandler()  # See _read.
    self._in_flight_step = None
    # The loop donates the state's buffers to the next step, so a save must take its copy
    # before it returns. Orbax takes it on the calling thread as a host transfer, and
    # starts a dozen threads on the way: 12-17 ms for the default 9 MiB state on 2 CPU
    # cores, and the transfer grows with the state (seconds for GiBs over PCIe). With
    # `device_snapshot` the loop only dispatches a copy on the devices; Orbax's part runs
    # on `_saver` against the copy, which is freed once Orbax holds it in host memory.
    # One process only: with several, Orbax's save syncs the processes through device
    # collectives, which must keep the same order as the train step's on every host.
    self._saver = None
    if (config.checkpoint.async_save and config.checkpoint.device_snapshot
        and jax.process_count() == 1 and not read_only):
      self._saver = futures.ThreadPoolExecutor(1, thread_name_prefix='checkpoint_save')
    self._submitted: futures.Future | None = None

  def latest_step(self) -> int | None:
    self._wait_submitted()
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict[str, Any], meta: dict[str, Any],
           metrics: dict[str, float] | None = None) -> None:
    """Starts an async save; an error of the previous save surfaces here, naming its step.

    Returns once the state may be donated: after dispatching a device copy of it (on the
    save thread, see __init__), or after Orbax's host copy.
    """
    if self.read_only:
      raise CheckpointError(f'Checkpoints in {self.directory} were opened read-only; '
                            f'not saving step {step}.')
    self._wait_submitted()  # At most one save being handed to Orbax (and one state copy).
    self._check_previous()
    meta = {**meta, 'step': step, 'config': config_to_dict(self.config),
            'topology': {'process_count': jax.process_count(),
                         'device_count': jax.device_count()}}
    if self._saver is not None:
      state = _device_copy(state)
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta))
    self._in_flight_step = step
    if self._saver is None:
      with self._naming_step(step):
        self.manager.save(step, args=args, metrics=metrics, force=True)
    else:
      self._submitted = self._saver.submit(self.manager.save, step, args=args,
                                           metrics=metrics, force=True)

  @contextlib.contextmanager
  def _naming_step(self, step: int | None):
    """Re-raises an error of saving `step` as a CheckpointError naming it and the directory."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      raise SaveError(f'Saving checkpoint step {step} in {self.directory} failed: '
                      f'{e}') from e

  def saving(self) -> bool:
    """Whether a save is still being taken or written (never blocks)."""
    return ((self._submitted is not None and not self._submitted.done())
            or self.manager.is_saving_in_progress())

  @property
  def unchecked_step(self) -> int | None:
    """The step of the newest save not yet known to have committed (None: none)."""
    return self._in_flight_step

  def _wait_submitted(self) -> None:
    """Waits until Orbax has taken the submitted save (not until it is written)."""
    submitted, self._submitted = self._submitted, None
    if submitted is not None:
      with self._naming_step(self._in_flight_step):
        submitted.result()

  def _check_previous(self) -> None:
    step, self._in_flight_step = self._in_flight_step, None
    with self._naming_step(step):
      self.manager.check_for_errors()

  def wait_until_finished(self) -> None:
    """Blocks until the in-flight save is committed; raises naming its step if it failed."""
    self._wait_submitted()
    with self._naming_step(self._in_flight_step):
      self.manager.wait_until_finished()
    self._check_previous()

  def close(self) -> None:
    self.wait_until_finished()
    if self._saver is not None:
      self._saver.shutdown()
    self._reader.close()
    self.manager.close()

  def _read(self, step: int, **items: Any) -> dict[str, Any]:
    """Reads `items` (name: Orbax restore args) of `step` on this process alone.

    Orbax's CheckpointManager.restore ends in a barrier of all processes (a device
    collective): a process that failed before it would leave the others waiting there
    for good. Its item handlers read without one; `restore` agrees on the outcome.
    """
    path = epath.Path(storage.join(self.directory, str(step)))
    return self._reader.restore(path, ocp.args.Composite(**items))

  def saved_meta(self, step: int | None = None) -> dict[str, Any]:
    """The metadata saved with `step` (default: the newest), its config included."""
    step = self.manager.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f'{self.directory} holds no committed checkpoint step.')
    return self._read(step, meta=ocp.args.JsonRestore())['meta']

  def newest_meta(self) -> dict[str, Any]:
    """The metadata of the newest step whose metadata reads ({} when there is none).

    For what a run keeps from its start (the schedule length), which every step carries
    alike; `restore` decides which step the state comes from and what an error means.
    """
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        return self.saved_meta(step)
      except Exception as e:  # pylint: disable=broad-except  # restore() will report it.
        logging.warning('Metadata of checkpoint step %d in %s does not read (%s: %s).',
                        step, self.directory, type(e).__name__, str(e)[:300])
    return {}

  def _offer(self, step: int, abstract_state: Any) -> tuple[str, Any, Exception | None]:
    """This process's attempt at `step`: ('ok', (state, data, meta), None), or an
    offer naming what went wrong ('config ...', 'unreadable ...', 'error ...') and the
    exception, for `multihost.lead_decides`."""
    try:
      meta = self.saved_meta(step)
      check_config_change(meta['config'], self.config)
      restored = self._read(step, state=ocp.args.StandardRestore(abstract_state),
                            data=ocp.args.JsonRestore())
      return 'ok', (restored['state'], restored['data'], meta), None
    except CheckpointError as e:  # The config changed: the same on every process.
      return f'config {e}', None, e
    except Exception as e:  # pylint: disable=broad-except
      kind = 'unreadable' if _unreadable(e) else 'error'
      return (f'{kind} process {jax.process_index()}: {type(e).__name__}: '
              f'{str(e)[:_OFFER_CHARS]}', None, e)

  def restore(self, abstract_state: Any, step: int | None = None,
              ) -> tuple[Any, dict[str, Any], dict[str, Any]] | None:
    """Restores `step` (default: the newest usable) onto `abstract_state`'s shardings.

    The saved config is compared with ours before any array is read. A step whose files
    are missing, truncated or corrupt is skipped with a warning naming it and the next
    older committed step is tried (read-only: the bad step is left where it is); it is
    set aside once an older step restored. Any other error (a transient I/O error, an
    out-of-memory, a shape or sharding mismatch) raises naming the step, and sets nothing
    aside. With several processes, each reads its part of a step and the lead decides
    for all: a step that any process cannot read is skipped by every process, an error
    on any process raises on every process, so all restore the same step or none.
    Returns None when there is no checkpoint at all.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    if step is not None:
      if step not in steps:
        raise CheckpointError(f'No checkpoint step {step} in {self.directory}; '
                              f'committed steps: {sorted(steps)}.')
      steps = [step]
    if not steps:
      return None
    errors = []
    for candidate in steps:
      offer, restored, local_error = self._offer(candidate, abstract_state)
      decision = multihost.lead_decides(f'restore_step_{candidate}', offer, _first_failure)
      kind, _, cause = decision.partition(' ')
      if kind == 'config':
        raise CheckpointError(cause) from local_error
      if kind == 'error':
        raise CheckpointError(
            f'Restoring checkpoint step {candidate} from {self.directory} failed on '
            f'{cause}. That is not a missing, truncated or corrupt file, so no older step '
            'is tried and nothing is set aside: fix the cause and rerun.') from local_error
      if kind == 'unreadable':
        logging.warning('Checkpoint step %d in %s is unreadable on %s; falling back to the '
                        'previous committed step.', candidate, self.directory, cause[:300])
        errors.append(f'step {candidate}: {cause[:200]}')
        continue
      logging.info('Restored checkpoint step %d from %s.', candidate, self.directory)
      if errors and not self.read_only:
        self._set_aside(steps[:steps.index(candidate)])
      return restored
    raise CheckpointError(f'No usable checkpoint in {self.directory}:\n  '
                          + '\n  '.join(errors))

  def _set_aside(self, bad_steps: list[int]) -> None:
    """Moves unreadable steps out of Orbax's sight, so training can save those steps
    again; the files are kept for inspection (a checkpoint is never deleted here; in a
    bucket, which has no rename, they are copied before the originals go)."""
    if jax.process_index() == 0:
      for step in bad_steps:
        path = storage.join(self.directory, str(step))
        aside = f'{path}.unreadable-{int(time.time())}'
        storage.move_tree(path, aside)
        logging.warning('Moved unreadable checkpoint step %d to %s.', step, aside)
    multihost.barrier('checkpoint_set_aside')
    self.manager.reload()

  def best_step(self) -> int | None:
    self._wait_submitted()
    return self.manager.best_step()


def init_from(config: ml_collections.ConfigDict, fresh: Any) -> Any:
  """`fresh` (a host or device state) with params and BatchNorm statistics from the run in
  `config.init_from`: all of them, or those under `config.init_prefixes`.

  A leaf whose shape differs (a new head for another number of classes) keeps its fresh
  initialization; every such leaf is logged, as are those the source lacks.
  """
  source_dir = storage.join(config.init_from, 'checkpoints')
  if not storage.is_dir(source_dir):
    source_dir = config.init_from  # Also accept the checkpoints directory itself.
  manager = ocp.CheckpointManager(source_dir, item_names=('state', 'data', 'meta'),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  step = config.init_from_step if config.init_from_step >= 0 else manager.latest_step()
  if step is None or step not in manager.all_steps():
    raise CheckpointError(f'config.init_from={config.init_from!r}: no checkpoint step '
                          f'{step} there; committed steps: {list(manager.all_steps())}.')
  saved = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore()))['state']
  prefixes = tuple(config.init_prefixes)
  taken, kept = [], []

  def pick(collection):
    source = _flatten(saved.get(collection) or {})
    def leaf(key_path, value):
      path = jax.tree_util.keystr(key_path, simple=True, separator='/')
      if prefixes and not optim.under_any(path, prefixes):
        return value
      if path not in source:
        kept.append(f'{collection}/{path} (absent in source)')
        return value
      if tuple(source[path].shape) != tuple(value.shape):
        kept.append(f'{collection}/{path} (shape {tuple(source[path].shape)} -> '
                    f'{tuple(value.shape)})')
        return value
      taken.append(path)
      return source[path].astype(value.dtype)
    return jax.tree_util.tree_map_with_path(leaf, getattr(fresh, collection))

  params, batch_stats = pick('params'), pick('batch_stats')
  logging.info('init_from %s step %d: %d leaves loaded; fresh init kept for: %s',
               config.init_from, step, len(taken), ', '.join(kept) or 'none')
  if not taken:
    raise CheckpointError(f'config.init_from={config.init_from!r} step {step}: no parameter '
                          f'matched (init_prefixes={prefixes}).')
  return fresh.replace(params=params, batch_stats=batch_stats)
