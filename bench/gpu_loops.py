"""The loop patterns of bench/throughput.py on one accelerator, without grain and CLU.

On the 2-core CPU the "device" is the host's own cores, so a loop that waits for every
step costs almost nothing there (bench/throughput.py, c/p). On an accelerator the host and
the device run side by side, and a step of the default CNN takes well under a millisecond:
there the host work each loop does per step, and whether it waits for the device, decide
the throughput. This script measures that with the pipeline's own step (`Trainer`'s
`steps.train_step` via `sharding.Parallel`), model and optimizer from configs/default.py,
on host numpy batches of Fashion-MNIST's shape (synthetic: the GPU image has no grain and
no TensorFlow, which CLU's writers import), interleaved round by round:

  (b)  bare   the compiled step on one device-resident batch, two steps in flight;
  (a') ours   the train loop's pattern: host batches put on the device two ahead by
              `prefetch.DevicePrefetch`, the step, a wait for the step 3 back, metrics
              fetched once per log window (`train.TrainWindow`);
  (a0) before the loop until 2026-11-27: the put inline (`Parallel.shard_batch`), each
              step's metrics fetched one step late;
  (c)  flax   the Flax ImageNet example's pattern: `jax.pmap` step with `lax.pmean`,
              batches through `prefetch_to_device(..., 2)`, metrics fetched every step;
  (p)  pmap   the step of (c) on a device-resident batch: the ceiling of (c).

It needs jax, flax, optax, clu and ml_collections only.

  python bench/gpu_loops.py [--batch 64] [--rounds 3] [--seconds 3]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flax import jax_utils  # pylint: disable=g-import-not-at-top
import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import default
from pipeline import losses
from pipeline import models
from pipeline import optim
from pipeline import prefetch
from pipeline import sharding
from pipeline import steps
import throughput  # bench/: imports neither jax nor grain at load.

IN_FLIGHT = 3  # train.TrainWindow.IN_FLIGHT (train.py imports grain, which is not here).


def flax_example_step(state, batch, *, num_classes: int):
  """As bench/throughput.py's (c): grads and metrics averaged with `lax.pmean`."""
  def loss_fn(params):
    logits = state.apply_fn({'params': params}, batch['input'], train=True)
    loss = optax.softmax_cross_entropy(logits, jax.nn.one_hot(batch['label'], num_classes))
    return loss.mean(), logits

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads = jax.lax.pmean(grads, axis_name='batch')
  metrics = {'loss': loss, 'accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['label'])}
  return state.apply_gradients(grads=grads), jax.lax.pmean(metrics, axis_name='batch')


class HostStream:
  """Host batches forever, with what `prefetch.DevicePrefetch` asks of a train iterator."""

  def __init__(self, batches):
    self._batches, self.step = batches, 0

  def __next__(self):
    self.step += 1
    return self._batches[(self.step - 1) % len(self._batches)]

  def state_at(self, step):
    return {'step': step}

  def close(self):
    pass


def timed(step, seconds: float, finish) -> float:
  """Steps/s of `step` over about `seconds`, `finish` (the wait for the last) included."""
  count, start = 0, time.perf_counter()
  while count < 10 or time.perf_counter() - start < seconds:
    step()
    count += 1
  finish()
  return count / (time.perf_counter() - start)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--seconds', type=float, default=3.0)
  parser.add_argument('--log-every', type=int, default=100,
                      help="(a'): steps per metrics fetch (train.log_every_steps)")
  args = parser.parse_args()

  config = default.get_config()
  config.train.global_batch_size = args.batch
  num_classes, shape = 10, (28, 28, 1)
  model = models.make_model(config)
  tx, lr_fn = optim.make_optimizer(config, 100_000)
  init = functools.partial(steps.init_state, model, tx, shape, jnp.float32, config.seed)
  parallel = sharding.Parallel(config)
  train_step = parallel.compile_train_step(
      functools.partial(steps.train_step, loss=losses.softmax_cross_entropy(num_classes),
                        learning_rate_fn=lr_fn),
      parallel.abstract_state(init))
  rng = np.random.default_rng(0)
  host_batches = [{'input': rng.normal(size=(args.batch, *shape)).astype(np.float32),
                   'label': rng.integers(0, num_classes, args.batch).astype(np.int32)}
                  for _ in range(16)]

  def host_stream():
    while True:
      yield from host_batches

  # (b) and (a'): the pipeline's step, compiled ahead of time as train.Trainer does.
  loops = {}
  state, batch = parallel.init_state(init), parallel.shard_batch(host_batches[0])
  train_step = train_step.lower(state, batch).compile()  # Ahead of time, as train.Trainer.
  bare = throughput.ResidentLoop(train_step, state, batch)
  loops['b'] = (bare.step, bare.drain)

  loop = {'state': parallel.init_state(init), 'pending': [], 'step': 0,
          'batches': prefetch.DevicePrefetch(HostStream(host_batches), parallel.shard_batch)}

  def ours_step():  # As train.train_and_evaluate with train.TrainWindow.
    loop['state'], metrics = train_step(loop['state'], next(loop['batches']))
    loop['pending'].append(metrics)
    if len(loop['pending']) > IN_FLIGHT:
      jax.block_until_ready(loop['pending'][-IN_FLIGHT - 1])
    loop['step'] += 1
    if loop['step'] % args.log_every == 0:  # The window's one fetch (train._host_metrics).
      stacked = jax.tree.map(lambda *xs: jnp.stack(xs, axis=-1), *loop['pending'])
      fetched = parallel.host_metrics(stacked)
      {k: m.compute() for k, m in vars(fetched).items() if not k.startswith('_')}
      loop['pending'] = []
  loops["a'"] = (ours_step, lambda: jax.block_until_ready(loop['state']))

  late = {'state': parallel.init_state(init), 'prev': None, 'stream': host_stream()}

  def late_step():  # The loop before TrainWindow kept metrics on the devices.
    batch = parallel.shard_batch(next(late['stream']))
    late['state'], metrics = train_step(late['state'], batch)
    if late['prev'] is not None:
      parallel.host_metrics(late['prev']).compute()
    late['prev'] = metrics
  loops['a0'] = (late_step, lambda: jax.block_until_ready(late['state']))

  # (c) and (p): the Flax example's pattern.
  pmap_step = jax.pmap(functools.partial(flax_example_step, num_classes=num_classes),
                       axis_name='batch', donate_argnums=(0,))
  count = jax.local_device_count()
  split = lambda b: {k: v.reshape(count, -1, *v.shape[1:]) for k, v in b.items()}
  flax_state = {'state': jax_utils.replicate(jax.jit(init)()),
                'batches': jax_utils.prefetch_to_device(map(split, host_stream()), 2)}

  def flax_step():
    flax_state['state'], metrics = pmap_step(flax_state['state'], next(flax_state['batches']))
    jax.device_get(jax_utils.unreplicate(metrics))
  loops['c'] = (flax_step, lambda: jax.block_until_ready(flax_state['state']))

  pbare = throughput.ResidentLoop(pmap_step, jax_utils.replicate(jax.jit(init)()),
                                  next(flax_state['batches']))
  loops['p'] = (pbare.step, pbare.drain)

  for step, finish in loops.values():  # Compile and warm up.
    for _ in range(3):
      step()
    finish()
  rates = {name: [] for name in loops}
  for round_index in range(args.rounds):
    for name, (step, finish) in loops.items():
      rates[name].append(timed(step, args.seconds, finish) * args.batch)
    print(f'round {round_index + 1}: ' + ', '.join(
        f'{name} {rates[name][-1]:,.0f} ex/s' for name in loops), flush=True)

  paired = lambda x, y: statistics.median(p / q for p, q in zip(rates[x], rates[y]))
  device = jax.devices()[0]
  print(f'\ndevice {device.device_kind} ({device.platform}) x{jax.device_count()}, jax '
        f'{jax.__version__}, default CNN, batch {args.batch}; examples/s, median of '
        f'{args.rounds} rounds; ratios paired per round')
  print('  '.join(f"{name} {statistics.median(rates[name]):,.0f}" for name in loops))
  ours = "a'"
  print(f"a'/b {paired(ours, 'b'):.3f}  a'/c {paired(ours, 'c'):.3f}  "
        f"a'/a0 {paired(ours, 'a0'):.3f}  c/p {paired('c', 'p'):.3f}  b/p {paired('b', 'p'):.3f}")


if __name__ == '__main__':
  main()
