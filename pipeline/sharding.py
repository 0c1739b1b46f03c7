"""Where arrays live: the device Mesh, state and batch shardings, and compiled steps.

This module alone knows the parallel mode. The loop asks it to create the state, to turn a
per-process numpy batch into device arrays and to compile the step functions, and gets the
same interface under `jit` (global arrays over a `jax.sharding.Mesh`) and `pmap` (the
Flax-examples pattern: replicated state, a leading device axis on batches).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

from flax import jax_utils
import jax
from jax.experimental import mesh_utils
from jax.experimental import multihost_utils
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from pipeline import config as config_lib

BATCH_AXES = ('data', 'fsdp')  # Batches are split over both axes: fsdp is data parallel too.


def _granules(devices) -> tuple[str, int]:
  """What the slower network joins, and how many: slices where the devices report more
  than one (TPU multislice), else processes (GPU nodes, local CPU processes)."""
  slices = {getattr(d, 'slice_index', 0) for d in devices}
  if len(slices) > 1:
    return 'slice', len(slices)
  return 'process', len({d.process_index for d in devices})


def make_mesh(config, devices=None) -> Mesh:
  """A (data, fsdp) Mesh in JAX's topology-aware device order, sized from config.

  With `mesh.dcn_data` = N > 1, the data axis is laid across N slices (or processes,
  where the devices have no slices): each holds a contiguous block of the data axis and
  the fsdp axis stays inside it, so only the data-parallel reduction crosses the slower
  network between them.
  """
  devices = jax.devices() if devices is None else list(devices)
  data, fsdp = config_lib.mesh_shape(config, len(devices))
  dcn = config.mesh.dcn_data
  granule, count = _granules(devices)
  # Auto axis types: the default (explicit) turns with_sharding_constraint into an
  # assertion.
  axis_types = (AxisType.Auto,) * len(BATCH_AXES)
  if dcn == 1:
    if granule == 'slice':
      raise ValueError(f'config.mesh.dcn_data=1 is invalid: the devices span {count} '
                       f'slices; set it to {count} to lay the data axis across them.')
    return jax.make_mesh((data, fsdp), BATCH_AXES, axis_types=axis_types, devices=devices)
  if count != dcn or data % dcn:
    where = f'{count} slices' if granule == 'slice' else f'{count} process(es) and no slices'
    raise ValueError(f'config.mesh.dcn_data={dcn} is invalid: it must equal the number of '
                     f'slices (or of processes where there are none) and divide the data '
                     f'axis ({data}); the devices span {where}.')
  grid = mesh_utils.create_hybrid_device_mesh(
      (data // dcn, fsdp), (dcn, 1), devices, process_is_granule=granule == 'process')
  return Mesh(grid, BATCH_AXES, axis_types=axis_types)


def _fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int) -> P:
  """Shards the largest dimension divisible by the fsdp size of an array of at least
  `min_size` elements; replicates the rest."""
  if fsdp_size == 1 or math.prod(shape) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp_size == 0 and shape[dim] >= fsdp_size:
      spec = [None] * len(shape)
      spec[dim] = 'fsdp'
      return P(*spec)
  return P()


class Parallel:
  """jit over a Mesh: global arrays, explicit shardings, donated state."""
  axis_name = None  # No named device axis: XLA partitions global arrays itself.

  def __init__(self, config, devices=None):
    self.mesh = make_mesh(config, devices)
    self.fsdp, self.fsdp_min_size = config.fsdp, config.fsdp_min_size
    self.batch_sharding = NamedSharding(self.mesh, P(BATCH_AXES))
    # A stack of batches for several steps in one call: the step axis stays whole.
    self.stacked_sharding = NamedSharding(self.mesh, P(None, BATCH_AXES))
    self.replicated = NamedSharding(self.mesh, P())

  def describe(self) -> str:
    return f'jit mesh {dict(self.mesh.shape)} fsdp={self.fsdp}'

  def state_shardings(self, abstract_state: Any) -> Any:
    fsdp_size = self.mesh.shape['fsdp'] if self.fsdp else 1
    return jax.tree.map(
        lambda x: NamedSharding(self.mesh, _fsdp_spec(x.shape, fsdp_size, self.fsdp_min_size)),
        abstract_state)

  def abstract_state(self, init_fn: Callable[[], Any]) -> Any:
    """Shapes, dtypes and target shardings of the state, computed without any FLOPs."""
    shapes = jax.eval_shape(init_fn)
    shardings = self.state_shardings(shapes)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shardings)

  def init_state(self, init_fn: Callable[[], Any]) -> Any:
    """Runs `init_fn` under jit so every leaf is created already sharded."""
    shardings = self.state_shardings(jax.eval_shape(init_fn))
    return jax.jit(init_fn, out_shardings=shardings)()

  def shard_batch(self, batch: dict[str, np.ndarray], stacked: bool = False,
                  ) -> dict[str, jax.Array]:
    """This process's share of the global batch -> global arrays sharded over the mesh.

    `stacked`: the arrays hold the batches of several steps on a leading axis.
    """
    sharding = self.stacked_sharding if stacked else self.batch_sharding
    if jax.process_count() == 1:  # The whole batch is local: one plain transfer is cheaper.
      return jax.device_put(batch, sharding)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}

  def compile_train_step(self, step_fn: Callable, abstract_state: Any,
                         stacked: bool = False, indexed: bool = False) -> Callable:
    """`step_fn` under jit, donating the state; `stacked`: it takes stacked batches;
    `indexed`: and then the index of the one it steps on."""
    shardings = jax.tree.map(lambda x: x.sharding, abstract_state)
    batch_sharding = self.stacked_sharding if stacked else self.batch_sharding
    return jax.jit(step_fn, in_shardings=(shardings, batch_sharding)
                   + ((self.replicated,) if indexed else ()),
                   out_shardings=(shardings, self.replicated), donate_argnums=0)

  def step_index(self, index: int) -> jax.Array:
    """`index` as the indexed train step takes it (`compile_train_step(indexed=True)`)."""
    return jax.device_put(np.int32(index), self.replicated)

  def executable(self, compiled: jax.stages.Compiled) -> Callable:
    """The compiled train step (`compile_train_step(...).lower(...).compile()`) as the
    loop calls it, with the loop's arrays."""
    return compiled

  def compile_eval_step(self, step_fn: Callable, abstract_state: Any) -> Callable:
    shardings = jax.tree.map(lambda x: x.sharding, abstract_state)
    return jax.jit(step_fn, in_shardings=(shardings, self.batch_sharding),
                   out_shardings=self.replicated)

  def compile_predict_step(self, step_fn: Callable, abstract_state: Any) -> Callable:
    shardings = jax.tree.map(lambda x: x.sharding, abstract_state)
    return jax.jit(step_fn, in_shardings=(shardings, self.batch_sharding),
                   out_shardings=self.replicated)

  def host_metrics(self, metrics: Any) -> Any:
    """Device metrics -> host numpy (an explicit transfer, allowed under the guard)."""
    return jax.device_get(metrics)

  def host_outputs(self, outputs: jax.Array) -> np.ndarray:
    """Per-example outputs of the global batch -> host rows, this process's block first."""
    rows = np.asarray(jax.device_get(outputs))
    return rows.reshape(-1, *rows.shape[-1:])

  def place(self, state: Any) -> Any:
    """A restored state (already on `abstract_state`'s shardings) -> the loop's layout."""
    return state

  def for_saving(self, state: Any) -> Any:
    """The loop's state -> the layout checkpoints hold (the same in both modes)."""
    return state

  def host_step(self, state: Any) -> int:
    return int(jax.device_get(state.step))


def _pmap_device_order() -> list[jax.Device]:
  """Every process's local devices, by process: the order `jax.pmap` maps over."""
  return [d for p in range(jax.process_count()) for d in jax.local_devices(process_index=p)]


class PmapParallel(Parallel):
  """The Flax-examples pattern: state replicated per local device, batches split on a
  leading device axis, gradients and BatchNorm statistics averaged with `lax.pmean`.

  Each process holds the rows of its own devices (host-local arrays, as `jax.pmap` takes
  them) and the collectives span every device of every process. Checkpoints hold one
  copy of the state as a global array replicated over all devices, as under jit, so
  either mode and any process count restores the other.
  """
  axis_name = 'batch'

  def __init__(self, config, devices=None):
    del config
    # All processes' devices: pmap over only the local ones would average gradients
    # within each process, and the processes would train apart.
    self.devices = _pmap_device_order() if devices is None else list(devices)
    self.mesh = Mesh(np.asarray(self.devices), (self.axis_name,))
    self.local_devices = list(self.mesh.local_mesh.devices.flat)
    stacked = P(self.axis_name)
    # The layout of pmap's own host-local inputs, so that it rewraps them without a copy.
    self._stacked = NamedSharding(self.mesh.local_mesh, stacked)
    self.replicated = NamedSharding(self.mesh, P())
    # Between the stacked state and one replicated global copy; pmap itself would need a
    # mapped input. No communication: every device already holds the same values.
    self._unstack = jax.jit(jax.shard_map(
        lambda tree: jax.tree.map(lambda x: x[0], tree), mesh=self.mesh,
        in_specs=stacked, out_specs=P(), check_vma=False))
    self._stack = jax.jit(jax.shard_map(
        lambda tree: jax.tree.map(lambda x: x[None], tree), mesh=self.mesh,
        in_specs=P(), out_specs=stacked, check_vma=False))

  def describe(self) -> str:
    return (f'pmap over {len(self.devices)} devices, {len(self.local_devices)} in this '
            'process')

  def _to_global(self, tree: Any) -> Any:
    return multihost_utils.host_local_array_to_global_array(
        tree, self.mesh, P(self.axis_name))

  def _to_local(self, tree: Any) -> Any:
    return multihost_utils.global_array_to_host_local_array(
        tree, self.mesh, P(self.axis_name))

  def abstract_state(self, init_fn: Callable[[], Any]) -> Any:
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.replicated),
        jax.eval_shape(init_fn))

  def init_state(self, init_fn: Callable[[], Any]) -> Any:
    return self.place(jax.jit(init_fn, out_shardings=self.replicated)())

  def place(self, state: Any) -> Any:
    """A global replicated state (restored or fresh) -> this process's stacked copies."""
    return self._to_local(self._stack(state))

  def for_saving(self, state: Any) -> Any:
    return self._unstack(self._to_global(state))

  def host_step(self, state: Any) -> int:
    return int(jax.device_get(jax_utils.unreplicate(state.step)))

  def shard_batch(self, batch: dict[str, np.ndarray], stacked: bool = False,
                  ) -> dict[str, jax.Array]:
    n = len(self.local_devices)

    def split(v):  # [B, ...] -> [n, B/n, ...]; stacked: [K, B, ...] -> [n, K, B/n, ...].
      if not stacked:
        return v.reshape(n, v.shape[0] // n, *v.shape[1:])
      return np.swapaxes(v.reshape(v.shape[0], n, v.shape[1] // n, *v.shape[2:]), 0, 1)
    return {k: jax.device_put(split(v), self._stacked) for k, v in batch.items()}

  def step_index(self, index: int) -> jax.Array:
    # One per local device, a mapped input like the others (multi-process calls convert
    # every argument alike).
    return jax.device_put(np.full(len(self.local_devices), index, np.int32), self._stacked)

  def compile_train_step(self, step_fn: Callable, abstract_state: Any,
                         stacked: bool = False, indexed: bool = False) -> Callable:
    del stacked, indexed  # The mapped function sees its device's rows of any layout.
    return jax.pmap(functools.partial(step_fn, axis_name=self.axis_name),
                    axis_name=self.axis_name, devices=self.devices, donate_argnums=0)

  def executable(self, compiled: jax.stages.Compiled) -> Callable:
    if jax.process_count() == 1:
      return compiled
    # A pmapped function converts host-local arguments and results on each call; the
    # executable of its lower().compile() takes global arrays (JAX leaves that to us).
    def step(*args):
      return self._to_local(compiled(*self._to_global(args)))
    return step

  def compile_eval_step(self, step_fn: Callable, abstract_state: Any) -> Callable:
    return jax.pmap(functools.partial(step_fn, axis_name=self.axis_name),
                    axis_name=self.axis_name, devices=self.devices)

  def compile_predict_step(self, step_fn: Callable, abstract_state: Any) -> Callable:
    return jax.pmap(step_fn, axis_name=self.axis_name, devices=self.devices)

  def host_outputs(self, outputs: jax.Array) -> np.ndarray:
    rows = np.asarray(jax.device_get(outputs))  # [local devices, rows per device, ...]
    rows = rows.reshape(-1, *rows.shape[2:])
    if jax.process_count() > 1:  # Each process holds its own block of the global batch.
      rows = np.asarray(multihost_utils.process_allgather(rows, tiled=True))
    return rows

  def host_metrics(self, metrics: Any) -> Any:
    # Gathered metrics are identical on every device; one copy is the global value.
    return jax.device_get(jax_utils.unreplicate(metrics))


def make_parallel(config, devices=None) -> Parallel:
  return {'jit': Parallel, 'pmap': PmapParallel}[config.parallelism](config, devices)
