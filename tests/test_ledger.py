"""The data ledger on real train streams (grain, synthetic data), without the trainer.

The end-to-end acceptance checks ride on runs other tests make anyway: SIGTERM + resume in
tests/test_checkpoint.py, 4 -> 2 (after a stop), 4 vs 1 and 2 -> 1 processes in
tests/test_multiprocess_train.py.
"""

import os
import time

import numpy as np
import pytest

from pipeline import config as config_lib
from pipeline import ledger as ledger_lib
from pipeline.data import make_data

TRAIN_SIZE, BATCH = 100, 32  # Batches straddle epochs: an epoch is 3.125 steps.


def _data(process_index=0, process_count=1, train_size=TRAIN_SIZE, batch=BATCH, shape=(4,)):
  config = config_lib.base_config()
  config.data.name, config.data.path = 'synthetic', ''
  config.data.synthetic_train_size, config.data.synthetic_eval_size = train_size, 16
  config.data.synthetic_shape = shape
  config.train.global_batch_size, config.eval.batch_size = batch, 16
  return make_data(config, process_index=process_index, process_count=process_count)


def _run(workdir, start_step, end_step, process_count=1, late_process=None):
  """Steps start_step+1..end_step through each process's Ledger, as the loop drives it;
  process `late_process` reads its stream one step ahead of the loop."""
  ledgers, iters = [], []
  for p in range(process_count):
    data = _data(p, process_count)
    ledgers.append(ledger_lib.Ledger(data, workdir, start_step, global_batch_size=BATCH,
                                     process_index=p, process_count=process_count))
    iters.append(data.train_iter(start_step + (p == late_process)))
  puts = [ledger.device_put(lambda batch: batch) for ledger in ledgers]
  for step in range(start_step + 1, end_step + 1):
    shares = [put(next(it)) for put, it in zip(puts, iters)]
    assert all('index' not in share for share in shares)  # Not for the devices.
    for ledger in ledgers:
      ledger.record(step)
  for ledger, it in zip(ledgers, iters):
    ledger.close()
    it.close()


def _batch_indices(steps, process_count):
  """The examples the processes' own train iterators give each step, concatenated."""
  iters = [_data(p, process_count).train_iter(0) for p in range(process_count)]
  out = [np.concatenate([next(it)['index'] for it in iters]) for _ in range(steps)]
  for it in iters:
    it.close()
  return out


def test_records_every_step_and_counts_each_epoch_once(tmp_path):
  workdir = str(tmp_path)
  _run(workdir, 0, 10, process_count=2)
  records = ledger_lib.read(workdir)
  digests = [r['digest'] for r in records if 'digest' in r]
  # The lead derives the global batch; it is what the two processes really read.
  assert digests == [ledger_lib.digest(ix) for ix in _batch_indices(10, 2)]
  assert len(set(digests)) == 10
  epochs = [r for r in records if 'epoch' in r]
  # 10 steps of 32 = 320 positions: epochs 0, 1, 2 end in steps 4, 7 and 10.
  assert [(r['epoch'], r['step']) for r in epochs] == [(0, 4), (1, 7), (2, 10)]
  assert all(r['distinct'] == r['examples'] == TRAIN_SIZE for r in epochs)


def test_resumed_ledger_equals_uninterrupted(tmp_path):
  reference = str(tmp_path / 'reference')
  _run(reference, 0, 10)
  # Stopped at step 8 after a checkpoint at 5 (steps 6-8 are trained again), resumed on
  # two processes; stopped again at 9 after a checkpoint at 7, the step that ends epoch 1
  # mid-batch, and resumed on one.
  workdir = str(tmp_path / 'resumed')
  _run(workdir, 0, 8)
  _run(workdir, 5, 9, process_count=2)
  _run(workdir, 7, 10)
  with open(os.path.join(reference, ledger_lib.LEDGER_FILE), encoding='utf-8') as f:
    expected = f.read()
  with open(os.path.join(workdir, ledger_lib.LEDGER_FILE), encoding='utf-8') as f:
    assert f.read() == expected


def test_batch_of_another_step_stops_the_run_naming_it(tmp_path):
  with pytest.raises(RuntimeError, match=r'batch trained at step 3 on process 1 holds'):
    # Process 1's stream starts one step late (an iterator restored at the wrong step).
    _run(str(tmp_path), 2, 4, process_count=2, late_process=1)


def test_torn_last_line_is_dropped_and_a_torn_middle_line_named(tmp_path):
  workdir = str(tmp_path)
  _run(workdir, 0, 3)
  path = os.path.join(workdir, ledger_lib.LEDGER_FILE)
  with open(path, 'a', encoding='utf-8') as f:
    f.write('{"step": 4, "dig')  # Killed mid-write.
  _run(workdir, 3, 5)
  reference = str(tmp_path / 'reference')
  _run(reference, 0, 5)
  assert ledger_lib.read(workdir) == ledger_lib.read(reference)
  with open(path, 'w', encoding='utf-8') as f:
    f.write('{"step": 1, "dig\n{"step": 2, "digest": "00"}\n')
  with pytest.raises(ValueError, match=r'ledger.jsonl: line 1 is not JSON'):
    ledger_lib.read(workdir)


def test_record_cost_is_small_next_to_a_step(tmp_path):
  """Per-step cost on the lead for an ImageNet-sized batch (1024 of a 100k split)."""
  data = _data(train_size=100_000, batch=1024, shape=(1,))
  ledger = ledger_lib.Ledger(data, str(tmp_path), 0, global_batch_size=1024,
                             process_index=0, process_count=1)
  put = ledger.device_put(lambda batch: batch)
  steps = 200
  batches = [{'index': data.train_indices(np.arange(s * 1024, (s + 1) * 1024))}
             for s in range(steps)]
  start = time.perf_counter()
  for step, batch in enumerate(batches, 1):
    put(batch)
    ledger.record(step)
  seconds = (time.perf_counter() - start) / steps
  ledger.close()
  print(f'ledger: {seconds * 1e6:.0f} us per step (batch 1024)')
  assert len(ledger_lib.read(str(tmp_path))) == steps + 2  # Epochs end at 98 and 196.
  # A generous bound for a loaded CI core; measured ~100x lower.
  assert seconds < 5e-3, seconds
