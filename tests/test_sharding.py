"""Parallel layouts agree: mesh shapes, fsdp on/off, gradient accumulation, jit vs pmap;
the Mesh takes JAX's topology-aware device order."""

import dataclasses

import jax
from jax.experimental import mesh_utils
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from configs import fashion_mnist_cnn
from configs import rotten_tomatoes_lstm
from pipeline import reporting
from pipeline import sharding
from pipeline import train


def _config(model='cnn', **overrides):
  if model == 'lstm':
    config = rotten_tomatoes_lstm.get_config('smoke')
    config.data.max_len = 24
    config.model.lstm_sizes = (32, 32)
    config.model.lstm_dense_size = 16
    config.model.embed_dim = 16
    config.model.lstm_dropout_rate = 0.0  # Dropout masks are drawn per device under pmap.
  else:
    config = fashion_mnist_cnn.get_config('smoke')
    config.data.name = 'synthetic'
    config.data.path = ''
    config.data.synthetic_train_size = 512
    config.data.synthetic_eval_size = 64
    config.model.name = model
    config.model.hidden_size = 32
    config.model.dropout_rate = 0.0  # Dropout masks are drawn per device under pmap.
  config.train.global_batch_size = 32
  config.optimizer.warmup_steps = 2
  config.update_from_flattened_dict(overrides)
  return config


def _losses(config, num_steps, state=None):
  trainer = train.Trainer(config, workdir=None)
  state = trainer.parallel.init_state(trainer.init_fn) if state is None else state
  batches = trainer.data.train_iter(0)
  losses = []
  for _ in range(num_steps):
    state, metrics = trainer.train_fn(state, trainer.parallel.shard_batch(next(batches)))
    losses.append(float(trainer.parallel.host_metrics(metrics).compute()['loss']))
  return losses, state, trainer


@pytest.mark.parametrize('mesh, fsdp', [((4, 2), False), ((2, 4), False), ((2, 4), True),
                                        ((1, 8), True)])
def test_mesh_shapes_and_fsdp_give_the_same_losses(mesh, fsdp):
  reference, _, _ = _losses(_config(), 3)
  losses, state, _ = _losses(
      _config(**{'mesh.data': mesh[0], 'mesh.fsdp': mesh[1], 'fsdp': fsdp}), 3)
  np.testing.assert_allclose(losses, reference, rtol=1e-5)
  kernel = state.params['backbone']['Dense_0']['kernel']  # [3136, 32]
  if fsdp:
    assert kernel.sharding.spec == P('fsdp', None)
    assert kernel.addressable_shards[0].data.shape == (3136 // mesh[1], 32)
    mu = state.opt_state  # Optimizer moments follow their parameter's sharding.
    specs = {leaf.sharding.spec for leaf in jax.tree.leaves(mu) if leaf.shape == kernel.shape}
    assert specs == {P('fsdp', None)}
    # Below fsdp_min_size (2**16 elements) an array stays whole: its collectives would
    # cost more than its update saves.
    assert state.params['backbone']['Dense_0']['bias'].sharding.is_fully_replicated
  else:
    assert kernel.sharding.is_fully_replicated


def test_fsdp_shards_the_largest_divisible_dimension_of_arrays_above_the_minimum():
  assert sharding._fsdp_spec((3136, 256), 8, 2**16) == P('fsdp', None)
  assert sharding._fsdp_spec((3, 3, 32, 64), 8, 2**16) == P()  # 18,432 elements.
  assert sharding._fsdp_spec((3, 3, 32, 64), 8, 0) == P(None, None, None, 'fsdp')
  assert sharding._fsdp_spec((10, 250), 8, 0) == P()  # Nothing divisible by 8.
  assert sharding._fsdp_spec((3136, 256), 1, 0) == P()


def test_gradient_accumulation_equals_the_big_batch():
  big, _, _ = _losses(_config(**{'train.global_batch_size': 128}), 3)
  accumulated, _, _ = _losses(
      _config(**{'train.global_batch_size': 128, 'optimizer.grad_accum_steps': 4}), 3)
  np.testing.assert_allclose(accumulated, big, rtol=1e-5)


def test_bfloat16_compute_trains():
  losses, state, _ = _losses(_config(**{'model.dtype': 'bfloat16'}), 12)
  assert all(np.isfinite(losses)) and np.mean(losses[-3:]) < np.mean(losses[:3])
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(state.params))


@pytest.mark.parametrize('model', ['cnn_bn', 'lstm'])
def test_jit_and_pmap_agree(model):
  jit_losses, jit_state, _ = _losses(_config(model), 5)
  pmap_losses, pmap_state, trainer = _losses(_config(model, parallelism='pmap'), 5)
  np.testing.assert_allclose(pmap_losses, jit_losses, rtol=1e-5)
  saved = trainer.parallel.for_saving(pmap_state)
  for a, b in zip(jax.tree.leaves(saved.batch_stats), jax.tree.leaves(jit_state.batch_stats)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_pmap_checkpoint_resumes_under_jit(tmp_path):
  # A constant schedule: the pmap leg's shorter num_steps must not change the lr.
  config = _config('cnn_bn', **{'train.num_steps': 8, 'train.log_every_steps': 1,
                                'optimizer.schedule': 'constant',
                                'checkpoint.every_steps': 4, 'train.eval_every_steps': 8})
  reference = str(tmp_path / 'jit')
  train.train_and_evaluate(config, reference)
  mixed = str(tmp_path / 'pmap_then_jit')
  pmap_config = _config('cnn_bn', **{'train.num_steps': 4, 'train.log_every_steps': 1,
                                     'optimizer.schedule': 'constant',
                                     'checkpoint.every_steps': 4,
                                     'train.eval_every_steps': 4, 'parallelism': 'pmap'})
  train.train_and_evaluate(pmap_config, mixed)
  state = train.train_and_evaluate(config, mixed)  # Resumes step 4 under jit.
  assert int(jax.device_get(state.step)) == 8
  losses = lambda w: {r['step']: r['train/loss'] for r in reporting.read_jsonl(w)
                      if 'train/loss' in r}
  mixed_losses, ref_losses = losses(mixed), losses(reference)
  assert sorted(mixed_losses) == list(range(1, 9))
  np.testing.assert_allclose([mixed_losses[s] for s in range(1, 9)],
                             [ref_losses[s] for s in range(1, 9)], rtol=1e-5)


@dataclasses.dataclass(frozen=True)
class FakeTpu:
  """The attributes JAX's mesh helpers read from a TPU device: chip coordinates in the
  torus, the slice, the process."""
  id: int
  process_index: int
  slice_index: int
  coords: tuple[int, int, int]
  core_on_chip: int = 0
  platform: str = 'tpu'
  device_kind: str = 'TPU v4'


@dataclasses.dataclass(frozen=True)
class FakeHost:
  """A device with no slice_index (GPU nodes, CPU processes): processes are the granules."""
  id: int
  process_index: int
  platform: str = 'cpu'
  device_kind: str = 'cpu'


def _fake_tpus(slices):
  """`slices` TPU v4 slices of 2x2x2 chips (8 devices), 2 processes per slice."""
  devices = []
  for s in range(slices):
    for i, (z, y, x) in enumerate(np.ndindex(2, 2, 2)):
      devices.append(FakeTpu(id=8 * s + i, process_index=2 * s + i // 4, slice_index=s,
                             coords=(x, y, z)))
  return devices


def _mesh_config(data, fsdp, dcn_data=1):
  return _config(**{'mesh.data': data, 'mesh.fsdp': fsdp, 'mesh.dcn_data': dcn_data})


def _ids(grid):
  return [[d.id for d in row] for row in np.asarray(grid)]


@pytest.mark.parametrize('shape', [(8, 1), (4, 2), (2, 4), (1, 8)])
def test_mesh_takes_jax_device_order(shape):
  mesh = sharding.make_mesh(_mesh_config(*shape))
  expected = jax.make_mesh(shape, sharding.BATCH_AXES, axis_types=(AxisType.Auto,) * 2)
  assert _ids(mesh.devices) == _ids(expected.devices)
  assert mesh.axis_names == sharding.BATCH_AXES
  assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)
  # On a TPU torus the helper's order is not jax.devices() reshaped; ours follows it.
  tpus = _fake_tpus(1)
  topology = mesh_utils.create_device_mesh(shape, tpus)
  assert _ids(sharding.make_mesh(_mesh_config(*shape), tpus).devices) == _ids(topology)
  if shape == (8, 1):
    assert _ids(topology) != _ids(np.asarray(tpus).reshape(shape))


def test_dcn_data_lays_the_data_axis_across_slices():
  tpus = _fake_tpus(2)
  mesh = sharding.make_mesh(_mesh_config(8, 2, dcn_data=2), tpus)
  expected = mesh_utils.create_hybrid_device_mesh((4, 2), (2, 1), tpus)
  assert _ids(mesh.devices) == _ids(expected)
  slices = np.vectorize(lambda d: d.slice_index)(mesh.devices)
  assert (slices[:4] == 0).all() and (slices[4:] == 1).all()  # fsdp stays in a slice.
  with pytest.raises(ValueError, match=r'config.mesh.dcn_data=1 is invalid.*2 slices'):
    sharding.make_mesh(_mesh_config(8, 2), tpus)


def test_dcn_data_without_slices_takes_processes():
  hosts = [FakeHost(id=i, process_index=i // 4) for i in range(8)]
  mesh = sharding.make_mesh(_mesh_config(8, 1, dcn_data=2), hosts)
  expected = mesh_utils.create_hybrid_device_mesh((4, 1), (2, 1), hosts,
                                                  process_is_granule=True)
  assert _ids(mesh.devices) == _ids(expected)
  processes = np.vectorize(lambda d: d.process_index)(mesh.devices)
  assert processes.ravel().tolist() == [0] * 4 + [1] * 4
  # One process, no slices: nothing for dcn_data=2 to span.
  with pytest.raises(ValueError, match=r'config.mesh.dcn_data=2 is invalid.*1 process'):
    sharding.make_mesh(_mesh_config(8, 1, dcn_data=2))
