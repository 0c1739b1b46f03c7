"""Predict mode: classify image files or lines of text with a saved checkpoint.

    python -m pipeline.main --mode=predict --config=configs/fashion_mnist_cnn.py \
        --workdir=/tmp/fmnist --config.predict.input=photos/

Inputs go through `Data.preprocess`, the ops eval uses, and through the checkpoint that
evaluate mode scores. One JSON line per input lands in `config.predict.output`.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Sequence

from absl import logging
import jax
import numpy as np

from pipeline import evaluate as evaluate_lib
from pipeline import steps
from pipeline import storage
from pipeline.data import images

OUTPUT_FILE = 'predictions.jsonl'


def _invalid(value: str, why: str) -> ValueError:
  return ValueError(f'config.predict.input={value!r} is invalid: {why}.')


def check_input(path: str) -> None:
  """Fails before anything is loaded when the input cannot exist."""
  if not path:
    raise _invalid(path, 'name an image file or folder, a text file, or - for stdin')
  if path != '-' and not storage.exists(path):
    raise _invalid(path, 'no such file or folder')


def read_inputs(path: str, *, text: bool) -> list[str]:
  """The raw inputs named by `path`: image paths, or texts (one per non-blank line).

  Args:
    path: an image file or a folder of images (read in sorted name order), or a text
      file, or '-' for stdin; files and folders may be local or gs://.
    text: whether the workload classifies text.
  """
  check_input(path)
  if text:
    if storage.is_dir(path):
      raise _invalid(path, 'a text model reads a text file (one text per line) or -, '
                     'not a folder')
    if path == '-':
      lines = sys.stdin.read().splitlines()
    else:
      lines = storage.read_text(path).splitlines()
    inputs = [line for line in lines if line.strip()]
    if not inputs:
      raise _invalid(path, 'no text in it (one text per line)')
    return inputs
  if path == '-':
    raise _invalid(path, 'stdin is for text models; name an image file or folder')
  if not storage.is_dir(path):
    return [path]
  inputs = [entry for entry in storage.list_dir(path)
            if entry.lower().endswith(images.EXTENSIONS) and storage.is_file(entry)]
  if not inputs:
    raise _invalid(path, f'the folder holds no images ({" ".join(images.EXTENSIONS)})')
  return inputs


def classify(trainer: Any, state: steps.TrainState, raw_inputs: Sequence[Any],
             batch_size: int) -> np.ndarray:
  """Class probabilities [len(raw_inputs), num_classes], in input order.

  Every batch is padded to the same size, a multiple of the device count, so the step
  compiles once; the padding rows are dropped.
  """
  size = -(-batch_size // jax.device_count()) * jax.device_count()
  share = size // jax.process_count()  # Each process feeds its block of a global batch.
  start_row = jax.process_index() * share
  out = []
  for start in range(0, len(raw_inputs), size):
    chunk = raw_inputs[start:start + size]
    inputs = trainer.data.preprocess(chunk)
    padded = np.zeros((size, *inputs.shape[1:]), inputs.dtype)
    padded[:len(inputs)] = inputs
    batch = trainer.parallel.shard_batch({'input': padded[start_row:start_row + share]})
    probs = trainer.parallel.host_outputs(trainer.predict_step(state, batch))
    out.append(np.asarray(probs[:len(chunk)], np.float32))
  return np.concatenate(out)


def predict(config, workdir: str) -> list[dict[str, Any]]:
  """Predict mode: classifies `config.predict.input` with the checkpoint evaluate uses.

  Returns:
    One record per input, as written to `config.predict.output` (default
    WORKDIR/predictions.jsonl): {"input": path or text, "label": name, "label_id": id,
    "probabilities": {name: p, ...}}.
  """
  check_input(config.predict.input)
  if config.data.name == 'synthetic':
    raise ValueError('config.data.name=\'synthetic\' is invalid for predict mode: it reads '
                     'image files or text, and synthetic data has neither.')
  trainer, state, step = evaluate_lib.load_checkpoint(config, workdir)
  data = trainer.data
  raw_inputs = read_inputs(config.predict.input, text=data.vectorizer is not None)
  probs = classify(trainer, state, raw_inputs, config.predict.batch_size)
  names = data.label_names
  records = []
  for raw, p in zip(raw_inputs, probs):
    label_id = int(np.argmax(p))
    records.append({'input': raw, 'label': names[label_id], 'label_id': label_id,
                    'probabilities': {name: float(v) for name, v in zip(names, p)}})
  output = config.predict.output or storage.join(workdir, OUTPUT_FILE)
  if jax.process_index() == 0:
    if storage.is_local(output):
      storage.make_dirs(os.path.dirname(os.path.abspath(output)))
    storage.write_text(output, ''.join(json.dumps(record, ensure_ascii=False) + '\n'
                                       for record in records))
  logging.info('Classified %d inputs with checkpoint step %d of %s; wrote %s.',
               len(records), step, workdir, output)
  return records
