"""DevicePrefetch: the loop sees the same batches, the checkpointed state is the loop's
position (not the thread's), and an error reaches the `next()` of its batch."""

import time

import jax
import numpy as np
import pytest

from pipeline import config as config_lib
from pipeline import prefetch
from pipeline import sharding
from pipeline.data import make_data


def _data():
  config = config_lib.base_config()
  config.data.name = 'synthetic'
  config.data.path = ''
  config.data.synthetic_train_size = 256
  config.data.synthetic_shape = (6, 6, 1)
  config.train.global_batch_size = 32
  return config, make_data(config, process_index=0, process_count=1)


@pytest.mark.parametrize('depth', [3, 0])  # 0: no thread, each batch put by next().
def test_same_batches_on_the_devices_and_state_of_the_loop(depth):
  config, data = _data()
  parallel = sharding.make_parallel(config)
  batches = prefetch.DevicePrefetch(data.train_iter(5), parallel.shard_batch, depth=depth)
  got = [next(batches) for _ in range(4)]
  time.sleep(0.2)  # Let the thread run ahead as far as it can.
  state = batches.get_state()
  expected = data.train_iter(5)
  for batch in got:
    want = next(expected)
    assert isinstance(batch['input'], jax.Array)
    assert batch['input'].sharding == parallel.batch_sharding
    for key in want:
      np.testing.assert_array_equal(jax.device_get(batch[key]), want[key])
  assert state['step'] == 9  # 5 + the 4 batches returned, not those made ahead.
  resumed = data.train_iter(0)
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)['input'], jax.device_get(next(batches)['input']))
  batches.close()


@pytest.mark.parametrize('depth', [2, 0])
def test_error_is_raised_by_the_next_of_its_batch(depth):
  _, data = _data()
  calls = []

  def put(batch):
    calls.append(1)
    if len(calls) == 3:
      raise ValueError('bad batch 3 from put')
    return batch

  batches = prefetch.DevicePrefetch(data.train_iter(0), put, depth=depth)
  next(batches)
  next(batches)
  with pytest.raises(ValueError, match='bad batch 3 from put'):
    next(batches)
  batches.close()
