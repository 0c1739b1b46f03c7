"""Training throughput: our real loop against the compute ceiling and two reference loops.

  python bench/throughput.py                       # default CNN, --devices 8 then 1 (~2-3 min)
  python bench/throughput.py --model resnet18 --devices 1     # ResNet-18 32x32, width 16
  python bench/throughput.py --model lstm --rounds 6 --seconds 4   # longer, less noisy
  python bench/throughput.py --variants ab                    # only ours and the ceiling

(--model resnet18 with both device counts takes ~6 min: (d) on 8 devices computes the whole
batch on every device, ~7 s a step.)

Five loops on the same model, devices, global batch and data, in examples/s:
  (a) ours     `train.train_and_evaluate` on real data through grain, with metrics and
               logging; the figure is the loop's own perf/examples_per_sec per log window
               (the value written to WORKDIR/metrics.jsonl). The first window holds the
               compile and is dropped; eval and checkpoints are pushed past the end.
  (b) bare     `Trainer.train_fn` on one device-resident batch, blocking on the previous
               step's metrics (the compute ceiling of the compiled step).
  (c) flax     the Flax ImageNet example's loop: a `jax.pmap` step with `lax.pmean`,
               host numpy batches reshaped to [devices, B/devices, ...] and put on the
               devices through `flax.jax_utils.prefetch_to_device(..., 2)`, metrics
               fetched every step.
  (d) book     the whole batch replicated to every device with `jax_utils.replicate` each
               step (each device computes the full batch), metrics unreplicated and
               fetched every step.
  (p) pmap     the step of (c) on one batch already on the devices, never waiting for its
               metrics but to keep two steps in flight: the ceiling of (c). c/p is what
               (c) loses to its per-step fetch, b/p how our compiled step compares.
The variants run in rounds, interleaved (a, b, c, d, a, b, ...), because the 2 CPU cores
are shared: (b), (c), (d), (p) each run a timed segment after every log window of (a), from the
loop's metric writer, whose time the loop does not count (see
`harness.interleaved_real_loop`). Each figure is the median over rounds, each ratio the
median of the ratios paired within a round.
Model FLOP/s = FLOPs of one step (XLA cost analysis of the step compiled for one device)
x steps/s, divided by the f32 matmul peak (a 2048x2048 jnp.dot) timed in every round.

Every loop bounds the steps in flight: on a 2-core CPU, ~30 undispatched steps with
collectives abort XLA's CPU rendezvous.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import shutil
import sys
import tempfile

import harness


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--devices', default='8,1',
                      help='fake CPU device counts, comma-separated; one process per count')
  parser.add_argument('--model', default='cnn', choices=harness.MODELS)
  parser.add_argument('--width', type=int, default=16, help='resnet18: first-stage channels')
  parser.add_argument('--rounds', type=int, default=4, help='interleaved rounds per variant')
  parser.add_argument('--seconds', type=float, default=2.0,
                      help='timed seconds per variant per round (the real loop: per window)')
  parser.add_argument('--variants', default='abcdp', help='subset of a, b, c, d, p to run')
  parser.add_argument('--keep', action='store_true', help='keep the temporary workdirs')
  return parser.parse_args(argv)


def flax_example_train_step(state, batch, *, num_classes: int):
  """A train step as the Flax ImageNet example writes it, on our TrainState and model:
  gradients and metrics averaged over the pmap axis with `lax.pmean`."""
  import jax
  import jax.numpy as jnp
  import optax
  rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  rng = jax.random.fold_in(rng, jax.lax.axis_index('batch'))

  def loss_fn(params):
    variables = {'params': params}
    if state.batch_stats:
      variables['batch_stats'] = state.batch_stats
    logits, updates = state.apply_fn(variables, batch['input'], train=True,
                                     rngs={'dropout': rng}, mutable=['batch_stats'])
    loss = optax.softmax_cross_entropy(logits, jax.nn.one_hot(batch['label'], num_classes))
    return loss.mean(), (logits, updates)

  (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads = jax.lax.pmean(grads, axis_name='batch')
  new_state = state.apply_gradients(
      grads=grads, batch_stats=updates['batch_stats'] if state.batch_stats else state.batch_stats)
  metrics = {'loss': loss, 'accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['label'])}
  return new_state, jax.lax.pmean(metrics, axis_name='batch')


class ResidentLoop:
  """A compiled step on one batch already on the devices, at most two steps in flight."""

  def __init__(self, step_fn, state, batch):
    import jax
    self._jax = jax
    self._step_fn, self.state, self.batch = step_fn, state, batch
    self._previous = None

  def step(self):
    self.state, metrics = self._step_fn(self.state, self.batch)
    if self._previous is not None:
      self._jax.block_until_ready(self._previous)
    self._previous = metrics

  def drain(self):
    self._jax.block_until_ready(self.state)


class BareLoop(ResidentLoop):
  """(b) The compiled step of `Trainer` on one batch already on the devices."""

  def __init__(self, trainer):
    super().__init__(trainer.train_fn, trainer.parallel.init_state(trainer.init_fn),
                     trainer.parallel.shard_batch(next(trainer.data.train_iter(0))))


class PmapLoop:
  """(c) the Flax ImageNet example's loop, or (d) with `whole_batch`, the book's loop."""

  def __init__(self, config, trainer, *, whole_batch: bool):
    import jax
    from flax import jax_utils
    from pipeline import models, optim, steps
    self._jax, self._jax_utils = jax, jax_utils
    self._whole_batch = whole_batch
    devices = jax.local_devices()
    model = models.make_model(config, axis_name='batch')
    tx, _ = optim.make_optimizer(config, trainer.num_steps)
    init = functools.partial(steps.init_state, model, tx, trainer.data.input_shape,
                             trainer.data.input_dtype, config.seed)
    self.state = jax_utils.replicate(jax.jit(init)())
    self._step_fn = jax.pmap(
        functools.partial(flax_example_train_step, num_classes=config.data.num_classes),
        axis_name='batch', donate_argnums=(0,))
    self._host_batches = trainer.data.train_iter(0)
    if not whole_batch:
      count = len(devices)
      split = lambda batch: {k: v.reshape(count, -1, *v.shape[1:]) for k, v in batch.items()}
      self._device_batches = jax_utils.prefetch_to_device(map(split, self._host_batches), 2)
    self.last_metrics = None

  def step(self):
    if self._whole_batch:
      batch = self._jax_utils.replicate(next(self._host_batches))
    else:
      batch = next(self._device_batches)
    self.state, metrics = self._step_fn(self.state, batch)
    # Fetching every step is what both loops do; it also keeps one step in flight.
    self.last_metrics = self._jax.device_get(self._jax_utils.unreplicate(metrics))

  def drain(self):
    self._jax.block_until_ready(self.state)

  def close(self):
    self._host_batches.close()


class PmapBareLoop(ResidentLoop):
  """(p) The step of (c) on a device-resident batch, at most two steps in flight."""

  def __init__(self, flax_loop: PmapLoop):
    import jax
    # pylint: disable=protected-access
    super().__init__(flax_loop._step_fn,
                     jax.tree.map(lambda x: x.copy(), flax_loop.state),  # (c) donates its own.
                     next(flax_loop._device_batches))


def measure(args) -> dict:
  import jax
  from pipeline import train

  config = harness.make_config(args.model, width=args.width)
  batch_size = config.train.global_batch_size
  root = tempfile.mkdtemp(prefix='bench_throughput_')
  devices = jax.device_count()
  print(f'model={args.model} batch={batch_size} devices={devices} '
        f'({jax.devices()[0].platform}) rounds={args.rounds} seconds={args.seconds}',
        flush=True)
  trainer = train.Trainer(config, os.path.join(root, 'bare'))
  bare = BareLoop(trainer)
  flops = harness.compiled_flops(trainer.train_fn, bare.state, bare.batch)
  loops = {'b': bare}
  if 'c' in args.variants or 'p' in args.variants:
    loops['c'] = PmapLoop(config, trainer, whole_batch=False)
  if 'p' in args.variants:
    loops['p'] = PmapBareLoop(loops['c'])
  if 'd' in args.variants:
    loops['d'] = PmapLoop(config, trainer, whole_batch=True)
  for loop in loops.values():  # Compile and warm up outside the timed segments.
    for _ in range(2):
      loop.step()
    loop.drain()
  steps_b, elapsed_b = harness.timed_steps(bare.step, 0.5, finish=bare.drain)
  window = max(5, math.ceil(args.seconds * steps_b / elapsed_b))

  figures = {v: [] for v in 'abcdp'}
  peaks, waits = [], []

  def segment(round_index: int, scalars: dict) -> None:
    peaks.append(harness.matmul_peak())
    line = [f'round {round_index + 1}: peak {peaks[-1] / 1e9:.0f} GFLOP/s']
    if scalars is not None:
      figures['a'].append(scalars['perf/examples_per_sec'])
      waits.append(scalars['perf/data_wait_fraction'])
      line.append(f'a {figures["a"][-1]:,.0f} ex/s ({window} steps)')
    for variant in 'bcdp':
      if variant in args.variants:
        loop = loops[variant]
        steps, elapsed = harness.timed_steps(loop.step, args.seconds, finish=loop.drain)
        figures[variant].append(steps * batch_size / elapsed)
        line.append(f'{variant} {figures[variant][-1]:,.0f} ex/s ({steps} steps)')
    print(', '.join(line), flush=True)

  if 'a' in args.variants:
    harness.interleaved_real_loop(config, os.path.join(root, 'real'), window_steps=window,
                                  rounds=args.rounds, between=segment)
  else:
    for round_index in range(args.rounds):
      segment(round_index, None)
  for variant in ('c', 'd'):
    if variant in loops:
      loops[variant].close()
  if not args.keep:
    shutil.rmtree(root, ignore_errors=True)

  med = {v: harness.median(figures[v]) for v in 'abcdp'}

  def ratio(x, y):  # Paired within each round (same load on the shared cores), then median.
    return harness.median([p / q for p, q in zip(figures[x], figures[y])])

  def mfu(x):
    return harness.median([flops * r / batch_size / p for r, p in zip(figures[x], peaks)])

  return {
      'model': args.model, 'devices': devices, 'batch': batch_size,
      'a': med['a'], 'b': med['b'], 'c': med['c'], 'd': med['d'], 'p': med['p'],
      'a/b': ratio('a', 'b'), 'a/c': ratio('a', 'c'), 'a/d': ratio('a', 'd'),
      'c/p': ratio('c', 'p'), 'b/p': ratio('b', 'p'),
      'data_wait_a': harness.median(waits), 'flops_per_step': flops,
      'peak': harness.median(peaks), 'flops_a': flops * med['a'] / batch_size,
      'flops_b': flops * med['b'] / batch_size, 'mfu_a': mfu('a'), 'mfu_b': mfu('b'),
  }


def report(results: list[dict]) -> None:
  model = results[0]['model']
  print(f'\nThroughput, model={model}, global batch {results[0]["batch"]} '
        '(examples/s, median over rounds; ratios paired per round)')
  print(harness.table(
      [[r['devices'], r['a'], r['b'], r['c'], r['d'], r['a/b'], r['a/c'], r['a/d']]
       for r in results],
      ['devices', '(a) ours', '(b) bare', '(c) flax', '(d) book', 'a/b', 'a/c', 'a/d']))
  print('\nThe ceiling of (c): its step on a device-resident batch, no per-step fetch')
  print(harness.table(
      [[r['devices'], r['p'], r['c/p'], r['b/p']] for r in results],
      ['devices', '(p) pmap step', 'c/p (lost to the fetch)', 'b/p (our step vs it)']))
  print('\nModel FLOP/s (FLOPs/step from cost_analysis x steps/s) / f32 matmul peak')
  print(harness.table(
      [[r['devices'], r['flops_per_step'] / 1e9, r['flops_a'] / 1e9, r['flops_b'] / 1e9,
        r['peak'] / 1e9, r['mfu_a'], r['mfu_b'], r['data_wait_a']] for r in results],
      ['devices', 'GFLOP/step', '(a) GFLOP/s', '(b) GFLOP/s', 'peak GFLOP/s', '(a)/peak',
       '(b)/peak', '(a) data wait']))
  print('targets: a/b >= 0.95, a/c >= 1.30, ResNet-18 (a)/peak >= 0.30')


def main(argv):
  args = parse_args(argv)
  counts = harness.device_counts(args.devices)
  if len(counts) > 1:
    rest = [a for i, a in enumerate(argv) if a != '--devices' and
            not a.startswith('--devices=') and (i == 0 or argv[i - 1] != '--devices')]
    report(harness.fan_out(os.path.abspath(__file__), rest, counts))
    return
  harness.init_devices(counts[0])
  result = measure(args)
  report([result])
  harness.emit(result)


if __name__ == '__main__':
  main(sys.argv[1:])
