"""Checkpoint cost: how long an async save blocks the loop, against a step and a sync save.

  python bench/checkpoint.py                     # default CNN state, 1 device, 10 saves
  python bench/checkpoint.py --devices 8 --saves 20
  python bench/checkpoint.py --model resnet18 --width 64 --saves 3 --steps-between 2

For the default config's train state (params + AdamW moments), each round:
  1. trains `--steps-between` steps with no save in flight (steps/s outside a save),
  2. starts an async save through our `Checkpointer.save` (checkpoint.async_save=True) and
     times how long the call blocks the loop, as train.py calls it (the pending metrics
     are fetched first, as the loop does before a save),
  3. keeps training while the save is in flight, until the manager reports it finished
     (steps/s inside the save window; the window is known only at step boundaries),
  4. saves the same state with a synchronous `Checkpointer` (async_save=False) and times
     the whole call.
Async and sync saves alternate round by round, so both see the same load on the shared
cores. Figures are means over rounds (medians in brackets).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import harness


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--devices', type=int, default=1, help='fake CPU devices')
  parser.add_argument('--saves', type=int, default=10, help='async (and sync) saves')
  parser.add_argument('--steps-between', type=int, default=10,
                      help='train steps timed outside any save, per round')
  parser.add_argument('--model', default='cnn', choices=harness.MODELS)
  parser.add_argument('--width', type=int, default=16,
                      help='resnet18 channels (64 = the real net, a ~130 MiB state)')
  parser.add_argument('--keep', action='store_true', help='keep the checkpoint directories')
  return parser.parse_args(argv)


class Stepper:
  """The compiled train step on one device-resident batch, at most two steps in flight."""

  def __init__(self, trainer):
    import jax
    self._jax = jax
    self._step_fn = trainer.train_fn
    self.state = trainer.parallel.init_state(trainer.init_fn)
    self.batch = trainer.parallel.shard_batch(next(trainer.data.train_iter(0)))
    self.pending = None
    self.step_count = 0

  def step(self):
    self.state, metrics = self._step_fn(self.state, self.batch)
    self.step_count += 1
    if self.pending is not None:
      self._jax.block_until_ready(self.pending)
    self.pending = metrics

  def settle(self):
    """What train.py does before a save: fetch the pending metrics (waits for the step)."""
    if self.pending is not None:
      self._jax.device_get(self.pending)
      self.pending = None


def measure(args) -> dict:
  import jax
  from pipeline import checkpoint, train

  config = harness.make_config(args.model, width=args.width)
  root = tempfile.mkdtemp(prefix='bench_checkpoint_')
  trainer = train.Trainer(config, os.path.join(root, 'work'))
  sync_config = config.copy_and_resolve_references()
  sync_config.checkpoint.async_save = False
  async_ckpt = checkpoint.Checkpointer(os.path.join(root, 'async'), config)
  sync_ckpt = checkpoint.Checkpointer(os.path.join(root, 'sync'), sync_config)
  stepper = Stepper(trainer)
  data_state = trainer.data.train_iter(0).get_state()
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(trainer.parallel.for_saving(stepper.state)))
  print(f'model={args.model} devices={jax.device_count()} state={state_bytes / 2**20:.1f} MiB '
        f'saves={args.saves}', flush=True)
  for _ in range(3):  # Compile and warm up.
    stepper.step()
  stepper.settle()
  # One untimed save of each kind: the first save builds Orbax's handlers and directories.
  async_ckpt.save(stepper.step_count, stepper.state, data_state, {})
  async_ckpt.wait_until_finished()
  sync_ckpt.save(stepper.step_count, stepper.state, data_state, {})

  outside_rates, step_times, blocks, windows, inside_rates, syncs = [], [], [], [], [], []
  for round_index in range(args.saves):
    start = time.perf_counter()
    for _ in range(args.steps_between):
      stepper.step()
    stepper.settle()
    elapsed = time.perf_counter() - start
    outside_rates.append(args.steps_between / elapsed)
    step_times.append(elapsed / args.steps_between)

    start = time.perf_counter()
    async_ckpt.save(stepper.step_count, trainer.parallel.for_saving(stepper.state),
                    data_state, {})
    returned = time.perf_counter()
    blocks.append(returned - start)
    steps_inside = 0
    while async_ckpt.saving():
      stepper.step()
      steps_inside += 1
    stepper.settle()
    window = time.perf_counter() - returned
    windows.append(window)
    inside_rates.append(steps_inside / window if steps_inside else float('nan'))
    async_ckpt.wait_until_finished()

    start = time.perf_counter()
    sync_ckpt.save(stepper.step_count, trainer.parallel.for_saving(stepper.state),
                   data_state, {})
    sync_ckpt.wait_until_finished()
    syncs.append(time.perf_counter() - start)
    print(f'save {round_index + 1}: async blocks {blocks[-1] * 1e3:.1f} ms, window '
          f'{window * 1e3:.0f} ms ({steps_inside} steps), sync {syncs[-1] * 1e3:.0f} ms, '
          f'step {step_times[-1] * 1e3:.1f} ms', flush=True)
  async_ckpt.close()
  sync_ckpt.close()
  if not args.keep:
    shutil.rmtree(root, ignore_errors=True)

  inside = [r for r in inside_rates if r == r]
  return {
      'model': args.model, 'devices': jax.device_count(), 'state_mib': state_bytes / 2**20,
      'async_block_s': statistics.mean(blocks), 'async_block_median_s': statistics.median(blocks),
      'async_window_s': statistics.mean(windows), 'sync_s': statistics.mean(syncs),
      'sync_median_s': statistics.median(syncs), 'step_s': statistics.mean(step_times),
      'block/step': statistics.mean(b / s for b, s in zip(blocks, step_times)),
      'block/sync': statistics.mean(b / s for b, s in zip(blocks, syncs)),
      'steps_per_s_outside': statistics.mean(outside_rates),
      'steps_per_s_inside': statistics.mean(inside) if inside else float('nan'),
      'windows_with_steps': len(inside),
  }


def report(r: dict) -> None:
  ms = lambda s: s * 1e3
  print(f'\nCheckpoint saves, model={r["model"]}, devices={r["devices"]}, '
        f'state {r["state_mib"]:.1f} MiB (means over saves, medians in brackets)')
  print(harness.table([
      ['async save: loop blocked', f'{ms(r["async_block_s"]):.1f} ms '
       f'[{ms(r["async_block_median_s"]):.1f}]'],
      ['async save: in flight after return', f'{ms(r["async_window_s"]):.0f} ms'],
      ['sync save', f'{ms(r["sync_s"]):.0f} ms [{ms(r["sync_median_s"]):.0f}]'],
      ['one train step', f'{ms(r["step_s"]):.1f} ms'],
      ['async block / train step', f'{r["block/step"]:.2f}  (target < 1)'],
      ['async block / sync save', f'{r["block/sync"]:.2f}  (target <= 0.10)'],
      ['steps/s outside a save', f'{r["steps_per_s_outside"]:.2f}'],
      ['steps/s while a save is in flight', f'{r["steps_per_s_inside"]:.2f} '
       f'({r["windows_with_steps"]} windows held a step)'],
  ], ['figure', 'value']))


def main(argv):
  args = parse_args(argv)
  harness.init_devices(args.devices)
  result = measure(args)
  report(result)
  harness.emit(result)


if __name__ == '__main__':
  main(sys.argv[1:])
