"""Input pipeline: examples/s the data layer delivers against what the model consumes.

  python bench/input.py                          # both datasets, 1 device
  python bench/input.py --datasets fashion_mnist --devices 8 --rounds 5
  python bench/input.py --imagenet               # ImageNet-like JPEGs: start-up, images/s

With --imagenet it generates a folder of ImageNet-like JPEGs (bench/jpegs.py: 20,000
files of 500x375 in 100 class subfolders by default) and measures
  start-up     the `image_folder` start-up per file with a cold page cache
               (`imagenet_startup`);
  images/s     our ImageNet train path (Inception crop, 224, flip, normalized) for each
               --workers count and --threads count, against the Flax ImageNet example's
               tf.data path on the same files and cores (`imagenet_throughput`),
               alternated round by round.

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
import time

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
  parser.add_argument('--imagenet', action='store_true',
                      help='ImageNet-like JPEG folder instead of --datasets')
  parser.add_argument('--jpeg_dir', default=os.path.join(tempfile.gettempdir(),
                                                         'bench_imagenet_jpegs'),
                      help='--imagenet: where the JPEGs are generated (kept between runs)')
  parser.add_argument('--files', type=int, default=20000, help='--imagenet: JPEG count')
  parser.add_argument('--workers', default='0,1,2',
                      help='--imagenet: data.num_workers values measured (comma-separated)')
  parser.add_argument('--threads', default='2',
                      help='--imagenet: data.prefetch_threads values of our path (comma-separated)')
  parser.add_argument('--batch', type=int, default=128, help='--imagenet: batch size')
  parser.add_argument('--skip_startup', action='store_true', help='--imagenet: images/s only')
  return parser.parse_args(argv)


def _drop_page_cache() -> bool:
  """Empties the kernel's page cache (root only), so file reads hit the disk."""
  try:
    os.sync()
    with open('/proc/sys/vm/drop_caches', 'w') as f:
      f.write('3')
    return True
  except OSError:
    return False


def _folder_config(root: str):
  from pipeline import config as config_lib
  config = config_lib.base_config()
  config.data.name = 'image_folder'
  config.data.path = root
  config.data.num_classes = 100
  config.data.image_size = 224
  config.data.channels = 3
  config.data.validation_fraction = 0.02
  config.data.normalize = False  # Statistics are timed on their own.
  return config


def imagenet_startup(args) -> dict:
  """Seconds to build the `image_folder` data (make_data) per 10k files, cold cache.

  first start: lists the folder and writes the list to the workdir (process 0's work);
  restart: reads that list back (every later start, and the other processes);
  probe every header: what start-up did before (Image.open + verify of each file);
  statistics: decoding the 512-image sample for the channel mean/std, once per run.
  Alternated round by round; medians and the spread (min-max) over rounds.
  """
  from pipeline.data import images
  from pipeline.data import make_data

  config = _folder_config(args.jpeg_dir)
  workdir = tempfile.mkdtemp(prefix='bench_startup_')
  make_data(config, process_index=0, process_count=1, workdir=workdir)  # Writes the list.
  data = make_data(config, process_index=0, process_count=1)
  count = data.train_size + data.eval_size
  paths = data._splits['train'].paths + data._splits['validation'].paths  # pylint: disable=protected-access
  stats_config = _folder_config(args.jpeg_dir)
  stats_config.data.normalize = True

  def first_start():
    make_data(config, process_index=0, process_count=1, workdir=tempfile.mkdtemp(dir=workdir))

  variants = {
      'first start': first_start,
      'restart': lambda: make_data(config, process_index=0, process_count=1, workdir=workdir),
      'probe every header (before)': lambda: [images.probe(p) for p in paths],
      'statistics (512 decodes)': lambda: make_data(stats_config, process_index=0,
                                                    process_count=1),
  }
  per_file = {name: [] for name in variants}
  cold = True
  for round_index in range(args.rounds):
    for name, run in variants.items():
      cold = _drop_page_cache() and cold
      start = time.perf_counter()
      run()
      seconds = time.perf_counter() - start
      # Statistics cost the same whatever the folder's size: reported per run, not per file.
      per_file[name].append(seconds if name.startswith('statistics') else seconds / count)
    print(f'start-up round {round_index + 1}: ' + ', '.join(
        f'{n} {v[-1]:.3g} s' if n.startswith('statistics') else f'{n} {v[-1] * 1e6:.1f} us/file'
        for n, v in per_file.items()), flush=True)
  if not args.keep:
    shutil.rmtree(workdir, ignore_errors=True)
  return {'files': count, 'cold_cache': cold, 'per_file': per_file}


def _tf_data_batches(root: str, batch: int):
  """The Flax ImageNet example's train input (its input_pipeline.py), on image files.

  Per file: read, `tf.image.sample_distorted_bounding_box` (object box = the whole image,
  min_object_covered 0.1, aspect 3/4-4/3, area 0.08-1, 10 attempts), `decode_and_crop_jpeg`
  of that window, or of the center crop (padding 32) when the draw failed, bicubic resize
  to 224, random flip, normalization by the ImageNet mean/std; shuffled, batched,
  AUTOTUNE parallelism and prefetch, as there.
  """
  import tensorflow as tf
  paths = sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files
                 if f.endswith('.jpg'))
  mean = tf.constant([0.485 * 255, 0.456 * 255, 0.406 * 255])
  std = tf.constant([0.229 * 255, 0.224 * 255, 0.225 * 255])

  def center(image_bytes, shape):
    side = tf.cast(224 / (224 + 32) * tf.cast(tf.minimum(shape[0], shape[1]), tf.float32),
                   tf.int32)
    window = tf.stack([(shape[0] - side + 1) // 2, (shape[1] - side + 1) // 2, side, side])
    return tf.io.decode_and_crop_jpeg(image_bytes, window, channels=3)

  def load(path):
    image_bytes = tf.io.read_file(path)
    shape = tf.io.extract_jpeg_shape(image_bytes)
    begin, size, _ = tf.image.sample_distorted_bounding_box(
        shape, bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
        min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0),
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    window = tf.stack([begin[0], begin[1], size[0], size[1]])
    failed = tf.reduce_all(tf.equal(size[:2], shape[:2]))
    image = tf.cond(failed, lambda: center(image_bytes, shape),
                    lambda: tf.io.decode_and_crop_jpeg(image_bytes, window, channels=3))
    image = tf.image.resize([image], [224, 224], method='bicubic')[0]
    image = tf.image.random_flip_left_right(image)
    return (image - mean) / std

  dataset = tf.data.Dataset.from_tensor_slices(paths).repeat().shuffle(4 * batch, seed=0)
  dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE)
  return iter(dataset.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE))


def imagenet_throughput(args) -> dict:
  """Images/s of our train path per worker count and of the tf.data path, alternated.

  Each segment builds its iterator, takes 3 batches (start-up, compilation of the tf.data
  graph, worker processes starting), then counts batches for --seconds; medians and
  min-max over --rounds rounds. Also CPU-ms per image: the CPU time of this process and
  its (joined) worker processes over the whole segment, start-up included, per image
  delivered. On cores shared with other jobs, images/s follows the share of the cores each
  path wins (tf.data runs more threads); CPU per image does not.
  """
  from absl import flags
  from pipeline.data import make_data

  flags.FLAGS(sys.argv[:1])  # grain's worker processes read absl flags (see ARCHITECTURE).

  def ours(workers: int, threads: int):
    config = _folder_config(args.jpeg_dir)
    config.data.inception_crop = True
    config.data.random_flip = True
    config.data.normalize = True
    config.data.mean, config.data.std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    config.data.num_workers = workers
    config.data.prefetch_threads = threads
    config.train.global_batch_size = args.batch
    return make_data(config, process_index=0, process_count=1).train_iter()

  variants = {f'ours, {w} workers, {t} threads': (lambda w=w, t=t: ours(w, t))
              for w in harness.device_counts(args.workers)
              for t in harness.device_counts(args.threads)}
  variants['tf.data (Flax example)'] = lambda: _tf_data_batches(args.jpeg_dir, args.batch)
  rates = {name: [] for name in variants}
  cpu_ms = {name: [] for name in variants}
  for round_index in range(args.rounds):
    for name, make in variants.items():
      cpu_start = _cpu_seconds()
      batches = make()
      for _ in range(3):
        next(batches)
      count, elapsed = harness.timed_steps(lambda: next(batches), args.seconds,
                                           finish=lambda: 0)
      rates[name].append(count * args.batch / elapsed)
      if hasattr(batches, 'close'):
        batches.close()  # Joins grain's worker processes, so their CPU time is counted.
      del batches
      cpu_ms[name].append((_cpu_seconds() - cpu_start) * 1e3 / ((count + 3) * args.batch))
    print(f'images/s round {round_index + 1}: ' + ', '.join(
        f'{n} {v[-1]:,.0f} ({cpu_ms[n][-1]:.2f} CPU-ms/image)' for n, v in rates.items()),
          flush=True)
  return {'rates': rates, 'cpu_ms': cpu_ms, 'threads': args.threads, 'batch': args.batch,
          'cores': os.cpu_count()}


def _cpu_seconds() -> float:
  import resource
  own = resource.getrusage(resource.RUSAGE_SELF)
  children = resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def report_throughput(result: dict) -> None:
  rates = result['rates']
  reference = rates['tf.data (Flax example)']
  print(f'\nImageNet-like train input, images/s (batch {result["batch"]}, our path with '
        f'read threads {result["threads"]}; medians, min-max over rounds; ratio paired '
        'per round)')
  cpu = result['cpu_ms']
  rows = [[name, harness.median(v), f'{min(v):,.0f}-{max(v):,.0f}',
           harness.median([a / b for a, b in zip(v, reference)]), harness.median(cpu[name]),
           f'{min(cpu[name]):.2f}-{max(cpu[name]):.2f}']
          for name, v in rates.items()]
  print(harness.table(rows, ['path', 'images/s', 'range', 'vs tf.data', 'CPU-ms/image',
                             'range']))
  print(f'{result["cores"]} cores on this host.')
  print('target: ours >= 1.0x tf.data')


def report_startup(result: dict) -> None:
  print(f'\nimage_folder start-up, {result["files"]:,} files, '
        f'{"cold" if result["cold_cache"] else "WARM (could not drop the page cache)"} cache '
        '(medians, min-max over rounds)')
  rows = []
  for name, values in result['per_file'].items():
    if name.startswith('statistics'):
      rows.append([name, '-', '-', f'{harness.median(values):.2f} s per run '
                   f'({min(values):.2f}-{max(values):.2f})'])
    else:
      us = [v * 1e6 for v in values]
      rows.append([name, f'{harness.median(us):.1f} ({min(us):.1f}-{max(us):.1f})',
                   f'{harness.median(values) * 1e4:.2f}', ''])
  print(harness.table(rows, ['what', 'us/file', 's per 10k files', 'note']))
  print('target: first start and restart <= 20 us/file')


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
  if args.imagenet:
    import jpegs
    seconds = jpegs.write_folder(args.jpeg_dir, args.files)
    if seconds:
      print(f'Wrote {args.files:,} JPEGs to {args.jpeg_dir} in {seconds:.0f} s.')
    results = {}
    if not args.skip_startup:
      results['startup'] = imagenet_startup(args)
      report_startup(results['startup'])
    results['throughput'] = imagenet_throughput(args)
    report_throughput(results['throughput'])
    harness.emit(results)
    return
  results = [measure(name, args) for name in args.datasets.split(',') if name]
  report(results)
  for result in results:
    harness.emit(result)


if __name__ == '__main__':
  main(sys.argv[1:])
