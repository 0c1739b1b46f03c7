"""Input pipeline: examples/s the data layer delivers against what the model consumes.

  python bench/input.py                          # both datasets, 1 device
  python bench/input.py --datasets fashion_mnist --devices 8 --rounds 5

For each dataset (Fashion-MNIST train with crop+flip, global batch 128, the default CNN;
Rotten Tomatoes vectorized, batch 64, the LSTM of configs/rotten_tomatoes_lstm.py):
  data        examples/s of `Data.train_iter` alone (grain, as configured: prefetch
              threads in this process), the consumer doing nothing else;
  data+put    the same plus `parallel.shard_batch` (host numpy -> device arrays), which is
              what train.py times as data wait;
  step        examples/s the bare compiled `Trainer.train_step` consumes on one
              device-resident batch (at most two steps in flight);
  data wait   perf/data_wait_fraction that train.py writes to metrics.jsonl in the real
              loop, per log window.
All four are measured in one run of the real loop: after each of its log windows the other
segments run from its metric writer (see `harness.interleaved_real_loop`), so they share
the load of the shared cores. Medians over rounds.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile

import harness

DATASETS = {'fashion_mnist': 'cnn', 'rotten_tomatoes': 'lstm'}


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--devices', type=int, default=1, help='fake CPU devices')
  parser.add_argument('--datasets', default=','.join(DATASETS),
                      help=f'comma-separated subset of {", ".join(DATASETS)}')
  parser.add_argument('--rounds', type=int, default=3, help='real-loop windows measured')
  parser.add_argument('--seconds', type=float, default=2.0, help='seconds per segment')
  parser.add_argument('--keep', action='store_true', help='keep the temporary workdirs')
  return parser.parse_args(argv)


def measure(dataset: str, args) -> dict:
  import jax
  from pipeline import train
  from throughput import BareLoop

  config = harness.make_config(DATASETS[dataset])
  batch_size = config.train.global_batch_size
  root = tempfile.mkdtemp(prefix='bench_input_')
  trainer = train.Trainer(config, os.path.join(root, 'bare'))
  bare = BareLoop(trainer)
  batches = trainer.data.train_iter(0)
  for _ in range(2):
    bare.step()
  steps, elapsed = harness.timed_steps(bare.step, 0.5, finish=bare.drain)
  window = max(5, math.ceil(args.seconds * steps / elapsed))
  figures = {'data': [], 'data+put': [], 'step': [], 'wait': [], 'loop': []}

  def segment(round_index: int, scalars: dict) -> None:
    figures['wait'].append(scalars['perf/data_wait_fraction'])
    figures['loop'].append(scalars['perf/examples_per_sec'])
    count, elapsed = harness.timed_steps(lambda: next(batches), args.seconds, finish=lambda: 0)
    figures['data'].append(count * batch_size / elapsed)

    def put():
      jax.block_until_ready(trainer.parallel.shard_batch(next(batches)))
    count, elapsed = harness.timed_steps(put, args.seconds, finish=lambda: 0)
    figures['data+put'].append(count * batch_size / elapsed)
    count, elapsed = harness.timed_steps(bare.step, args.seconds, finish=bare.drain)
    figures['step'].append(count * batch_size / elapsed)
    print(f'{dataset} round {round_index + 1}: ' + ', '.join(
        f'{k} {v[-1]:,.3g}' if k == 'wait' else f'{k} {v[-1]:,.0f} ex/s'
        for k, v in figures.items()), flush=True)

  harness.interleaved_real_loop(config, os.path.join(root, 'real'), window_steps=window,
                                rounds=args.rounds, between=segment)
  batches.close()
  if not args.keep:
    shutil.rmtree(root, ignore_errors=True)
  med = {k: harness.median(v) for k, v in figures.items()}
  paired = lambda x, y: harness.median([p / q for p, q in zip(figures[x], figures[y])])
  return {'dataset': dataset, 'model': config.model.name, 'batch': batch_size,
          'devices': jax.device_count(), **med,
          'data/step': paired('data', 'step'), 'data+put/step': paired('data+put', 'step')}


def report(results: list[dict]) -> None:
  print('\nInput pipeline vs model consumption (examples/s, medians; ratios paired per round)')
  print(harness.table(
      [[r['dataset'], r['model'], r['batch'], r['devices'], r['data'], r['data+put'],
        r['step'], r['data/step'], r['data+put/step'], r['loop'], r['wait']]
       for r in results],
      ['dataset', 'model', 'batch', 'devices', 'data', 'data+put', 'step (bare)',
       'data/step', 'data+put/step', 'real loop', 'loop data wait']))
  print('target: data/step >= 3')


def main(argv):
  args = parse_args(argv)
  harness.init_devices(args.devices)
  results = [measure(name, args) for name in args.datasets.split(',') if name]
  report(results)
  for result in results:
    harness.emit(result)


if __name__ == '__main__':
  main(sys.argv[1:])
