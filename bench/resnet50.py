"""ResNet-50 bf16 on synthetic 224x224 images, one accelerator: images/s and MFU.

  python bench/resnet50.py --batch 256            # on a GPU (bench/gpu.sh calls this)
  python bench/resnet50.py --cpu-dry-run          # tiny shapes on CPU: checks the code path

Starts from configs/imagenet_resnet50.py:smoke (synthetic data) and sets it back to the
real network: 224x224x3 inputs, width 64, bfloat16 compute, 1000 classes, `--batch`
global batch. Measures, interleaved as in bench/throughput.py:
  bare   `Trainer.train_fn` on one device-resident batch (at most two steps in flight);
  ours   `train.train_and_evaluate`: the loop's own perf/examples_per_sec per log window;
  flax   (with --flax-loop) the Flax ImageNet example's pmap loop with prefetch_to_device.
MFU = FLOPs per step (XLA cost analysis of the compiled step) x steps/s / the device's
dense bf16 peak from PEAK_BF16 (by device kind); a measured bf16 matmul is printed beside
it as a sanity check of that peak.

A persistent compilation cache in the temporary workdir lets the real loop reuse the bare
step's compile (same program), which keeps the run inside a few minutes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import harness

# Dense (no sparsity) bf16 tensor-core peak, FLOP/s, from the vendors' data sheets. First
# match of a substring of `device_kind` wins, so the specific names come first.
PEAK_BF16 = (
    ('H100 PCIe', 756e12),
    ('H100 NVL', 835e12),
    ('GH200', 989e12),
    ('H200', 989e12),
    ('H100', 989e12),  # SXM5, e.g. 'NVIDIA H100 80GB HBM3'.
    ('B200', 2250e12),
    ('A100', 312e12),
    ('L40S', 362e12),
    ('L4', 121e12),
    ('A10', 125e12),
)


def peak_bf16(device_kind: str) -> float | None:
  for name, peak in PEAK_BF16:
    if name in device_kind:
      return peak
  return None


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--batch', type=int, default=256, help='global batch')
  parser.add_argument('--rounds', type=int, default=3, help='interleaved rounds')
  parser.add_argument('--seconds', type=float, default=5.0, help='seconds per segment')
  parser.add_argument('--window', type=int, default=40,
                      help='real-loop steps per log window (fixed, so that the bare step '
                           'and the loop compile the same program and share the cache)')
  parser.add_argument('--flax-loop', action='store_true',
                      help='also time the Flax ImageNet example loop (one more compile)')
  parser.add_argument('--cpu-dry-run', action='store_true',
                      help='tiny shapes on the CPU, to check the script without a GPU')
  parser.add_argument('--keep', action='store_true', help='keep the temporary workdir')
  return parser.parse_args(argv)


def make_config(args):
  from configs import imagenet_resnet50
  config = imagenet_resnet50.get_config('smoke')  # Synthetic data, no dataset needed.
  config.model.dtype = 'bfloat16'
  # The smoke variant keeps the full config's 1560 warmup steps for 3 train steps, which
  # the schedule rejects; short_run (below) sets both.
  config.train.global_batch_size = args.batch
  config.eval.batch_size = args.batch
  if args.cpu_dry_run:
    config.data.synthetic_shape = (32, 32, 3)
    config.model.width = 8
  else:
    config.data.synthetic_shape = (224, 224, 3)
    config.model.width = 64
    config.data.num_classes = 1000
    config.data.prefetch_threads = 4
  # Two batches of distinct examples keep host memory small (each is 0.6 MB at 224x224).
  config.data.synthetic_train_size = 2 * args.batch
  config.data.synthetic_eval_size = args.batch
  return harness.short_run(config, (args.rounds + 1) * args.window, args.window)


def main(argv):
  args = parse_args(argv)
  if args.cpu_dry_run:
    args.batch, args.rounds, args.seconds, args.window = min(args.batch, 16), 1, 0.5, 5
  harness.init_devices(1, platform='cpu' if args.cpu_dry_run else 'gpu')
  import jax
  from pipeline import train
  from throughput import BareLoop, PmapLoop

  root = tempfile.mkdtemp(prefix='bench_resnet50_')
  jax.config.update('jax_compilation_cache_dir', os.path.join(root, 'jax_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  device = jax.devices()[0]
  config = make_config(args)
  batch = config.train.global_batch_size
  print(f'device: {device.device_kind} ({device.platform}) x {jax.device_count()}; '
        f'ResNet-50 width {config.model.width} {config.model.dtype}, input '
        f'{tuple(config.data.synthetic_shape)}, batch {batch}', flush=True)

  start = time.perf_counter()
  trainer = train.Trainer(config, os.path.join(root, 'bare'))
  bare = BareLoop(trainer)
  flops = harness.compiled_flops(trainer.train_fn, bare.state, bare.batch)
  for _ in range(2):
    bare.step()
  bare.drain()
  print(f'bare step compiled and warm in {time.perf_counter() - start:.0f} s; '
        f'{flops / 1e9:.1f} GFLOP per step', flush=True)
  loops = {'bare': bare}
  if args.flax_loop:
    loops['flax'] = PmapLoop(config, trainer, whole_batch=False)
    for _ in range(2):
      loops['flax'].step()
    loops['flax'].drain()
  matmul = harness.matmul_peak(512 if args.cpu_dry_run else 8192, reps=10, dtype='bfloat16')
  table_peak = peak_bf16(device.device_kind) if device.platform == 'gpu' else None
  peak = table_peak or matmul

  figures = {'ours': [], 'bare': [], 'flax': []}

  def segment(round_index: int, scalars: dict) -> None:
    figures['ours'].append(scalars['perf/examples_per_sec'])
    for name, loop in loops.items():
      count, elapsed = harness.timed_steps(loop.step, args.seconds, finish=loop.drain)
      figures[name].append(count * batch / elapsed)
    print(f'round {round_index + 1}: ' + ', '.join(
        f'{k} {v[-1]:,.0f} img/s' for k, v in figures.items() if v), flush=True)

  harness.interleaved_real_loop(config, os.path.join(root, 'real'), window_steps=args.window,
                                rounds=args.rounds, between=segment)
  if 'flax' in loops:
    loops['flax'].close()
  if not args.keep:
    shutil.rmtree(root, ignore_errors=True)

  med = {k: harness.median(v) for k, v in figures.items()}
  paired = lambda x, y: harness.median([p / q for p, q in zip(figures[x], figures[y])])
  peak_note = (f'{peak / 1e12:.0f} TFLOP/s bf16 (table, {device.device_kind})' if table_peak
               else f'{peak / 1e12:.3g} TFLOP/s (measured bf16 matmul; no table entry)')
  print(f'\nResNet-50 {config.model.dtype}, batch {batch}, {device.device_kind}')
  rows = [[name, med[name], flops * med[name] / batch / 1e12,
           flops * med[name] / batch / peak] for name in figures if figures[name]]
  print(harness.table(rows, ['loop', 'img/s', 'model TFLOP/s', 'MFU']))
  print(f'ours/bare {paired("ours", "bare"):.3f}' +
        (f', ours/flax {paired("ours", "flax"):.3f}' if figures['flax'] else ''))
  print(f'peak used for MFU: {peak_note}; measured bf16 matmul {matmul / 1e12:.3g} TFLOP/s')
  harness.emit({'device': device.device_kind, 'batch': batch, 'flops_per_step': flops,
                'peak': peak, 'matmul_bf16': matmul, **{k: med[k] for k in figures}})


if __name__ == '__main__':
  main(sys.argv[1:])
