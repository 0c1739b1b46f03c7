"""Where arrays live: the device Mesh, state and batch shardings, and compiled steps.

This module alone knows the parallel mode. The loop asks it to create the state, to turn a
per-process numpy batch into device arrays and to compile the step functions, and gets the
same interface under `jit` (global arrays over a `jax.sharding.Mesh`) and `pmap` (the
Flax-examples pattern: replicated state, a leading device axis on batches).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from flax import jax_utils
import jax
from jax.experimental import multihost_utils
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pipeline import config as config_lib

BATCH_AXES = ('data', 'fsdp')  # Batches are split over both axes: fsdp is data parallel too.


def make_mesh(config, devices=None) -> Mesh:
  """A (data, fsdp) Mesh over all devices, sized from config (-1 = the rest)."""
  devices = jax.devices() if devices is None else devices
  shape = config_lib.mesh_shape(config, len(devices))
  # Mesh(...) rather than jax.make_mesh: the latter defaults to explicit axis types.
  return Mesh(np.asarray(devices).reshape(shape), BATCH_AXES)


def _fsdp_spec(shape: tuple[int, ...], fsdp_size: int) -> P:
  """Shards the largest dimension divisible by the fsdp size; replicates the rest."""
  if fsdp_size == 1:
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
    self.fsdp = config.fsdp
    self.batch_sharding = NamedSharding(self.mesh, P(BATCH_AXES))
    self.replicated = NamedSharding(self.mesh, P())

  def describe(self) -> str:
    return f'jit mesh {dict(self.mesh.shape)} fsdp={self.fsdp}'

  def state_shardings(self, abstract_state: Any) -> Any:
    fsdp_size = self.mesh.shape['fsdp'] if self.fsdp else 1
    return jax.tree.map(
        lambda x: NamedSharding(self.mesh, _fsdp_spec(x.shape, fsdp_size)), abstract_state)

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

  def shard_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's share of the global batch -> global arrays sharded over the mesh."""
    if jax.process_count() == 1:  # The whole batch is local: one plain transfer is cheaper.
      return jax.device_put(batch, self.batch_sharding)
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, v)
            for k, v in batch.items()}

  def compile_train_step(self, step_fn: Callable, abstract_state: Any) -> Callable:
    shardings = jax.tree.map(lambda x: x.sharding, abstract_state)
    return jax.jit(step_fn, in_shardings=(shardings, self.batch_sharding),
                   out_shardings=(shardings, self.replicated), donate_argnums=0)

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


class PmapParallel(Parallel):
  """The Flax-examples pattern: state replicated per local device, batches split on a
  leading device axis, gradients and BatchNorm statistics averaged with `lax.pmean`.

  Checkpoints hold one copy of the state, as under jit, so either mode restores the other.
  """
  axis_name = 'batch'

  def __init__(self, config, devices=None):
    del config
    self.devices = jax.local_devices() if devices is None else devices
    self.device = self.devices[0]
    # A leading axis split over the local devices: the layout pmap expects.
    self._stacked = NamedSharding(Mesh(np.asarray(self.devices), ('devices',)), P('devices'))

  def describe(self) -> str:
    return f'pmap over {len(self.devices)} local devices'

  def abstract_state(self, init_fn: Callable[[], Any]) -> Any:
    single = jax.sharding.SingleDeviceSharding(self.device)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=single),
                        jax.eval_shape(init_fn))

  def init_state(self, init_fn: Callable[[], Any]) -> Any:
    return self.place(jax.jit(init_fn)())

  def place(self, state: Any) -> Any:
    return jax_utils.replicate(state, self.devices)

  def for_saving(self, state: Any) -> Any:
    return jax_utils.unreplicate(state)

  def host_step(self, state: Any) -> int:
    return int(jax.device_get(jax_utils.unreplicate(state.step)))

  def shard_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    n = len(self.devices)
    return {k: jax.device_put(v.reshape(n, v.shape[0] // n, *v.shape[1:]), self._stacked)
            for k, v in batch.items()}

  def compile_train_step(self, step_fn: Callable, abstract_state: Any) -> Callable:
    return jax.pmap(functools.partial(step_fn, axis_name=self.axis_name),
                    axis_name=self.axis_name, devices=self.devices, donate_argnums=0)

  def compile_eval_step(self, step_fn: Callable, abstract_state: Any) -> Callable:
    return jax.pmap(functools.partial(step_fn, axis_name=self.axis_name),
                    axis_name=self.axis_name, devices=self.devices)

  def compile_predict_step(self, step_fn: Callable, abstract_state: Any) -> Callable:
    return jax.pmap(step_fn, devices=self.devices)

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
