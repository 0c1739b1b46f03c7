"""Grain datasets over a source: the deterministic train stream, eval passes, `make_data`.

Train order. Training reads an infinite stream of global positions q = 0, 1, 2, ...;
position q is example `perm(seed, epoch)[q % N]` with epoch = q // N, and step s is
positions [s*G, (s+1)*G) for global batch G. Batches straddle epoch boundaries, so no
example is dropped and an epoch is N / G steps (not an integer in general). Process p of
P reads only its block [s*G + p*G/P, s*G + (p+1)*G/P). The order is therefore a pure
function of (seed, position): the same for any process count, and a run resumed at
step s reads what an uninterrupted run would have read. Augmentation is keyed on the
same (seed, position).

Eval. Global eval batch E, ceil(M / E) batches over the M examples in file order; process
p takes its block of each batch; positions past M are padding with mask False. Every
process yields the same number of batches and every example is counted once overall.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import sys
import threading
from typing import Any, Callable, Iterator, Sequence

import grain
import numpy as np

from pipeline import storage
from pipeline.data import images
from pipeline.data import on_device
from pipeline.data import run_files
from pipeline.data import source as source_lib
from pipeline.data import sources
from pipeline.data import text
from pipeline.data.errors import DataError

VOCABULARY_FILE = 'vocabulary.json'
DATA_INFO_FILE = 'data_info.json'
STATS_FILE = 'image_stats.json.gz'
_ORDER_SALT = 0x0DA7A  # Keeps the order stream apart from other uses of config.seed.
# Pixel statistics of file-backed image sets come from this many training images; the
# mean and std settle to about 3 digits well before that, and decoding all is slow.
STATS_SAMPLE = 512


class _Order:
  """Epoch permutations of [0, N), built on demand and shared by the reader threads."""

  def __init__(self, size: int, seed: int):
    self._size = size
    self._seed = seed % 2**63
    self._lock = threading.Lock()
    # A batch touches at most two epochs and prefetch threads run a few steps apart, so
    # three cached permutations avoid recomputing one (20 ms for 1M examples) per batch.
    self._cache: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()

  def __getstate__(self) -> dict:
    # grain pickles the dataset into its worker processes (data.num_workers > 0); a lock
    # cannot be pickled and the cache is cheap to rebuild there.
    return {'size': self._size, 'seed': self._seed}

  def __setstate__(self, state: dict) -> None:
    self.__init__(state['size'], state['seed'])

  def permutation(self, epoch: int) -> np.ndarray:
    with self._lock:
      if epoch in self._cache:
        self._cache.move_to_end(epoch)
        return self._cache[epoch]
    perm = np.random.default_rng([_ORDER_SALT, self._seed, epoch]).permutation(self._size)
    with self._lock:
      self._cache[epoch] = perm
      while len(self._cache) > 3:
        self._cache.popitem(last=False)
    return perm

  def indices(self, positions: np.ndarray) -> np.ndarray:
    """Example index for each global stream position."""
    epochs = positions // self._size
    out = np.empty_like(positions)
    for epoch in np.unique(epochs):
      where = epochs == epoch
      out[where] = self.permutation(int(epoch))[positions[where] % self._size]
    return out


class TrainIterator(grain.DatasetIterator):
  """Per-process train batches forever; the state is just the next step.

  Wraps a grain iterator over `MapDataset.range(step, inf).map(batch_fn)` with prefetch
  (threads, plus processes when data.num_workers > 0). The state {'step': s, ...} means the
  same on every process and for every process count, so `set_state` resumes at exactly
  step s whatever grain's own (worker-count dependent) state would have been.
  """

  def __init__(self, make: Callable[[int], Iterator[dict]], step: int, fingerprint: dict):
    super().__init__()
    self._make = make
    self._fingerprint = fingerprint
    self._step = step
    self._inner = make(step)
    self.skipped = 0  # Unreadable files this process stepped over since it was built.

  def __next__(self) -> dict[str, np.ndarray]:
    try:
      batch = next(self._inner)
    except DataError as e:
      # Re-raised here so the traceback ends in our code, not in a grain reader thread.
      raise DataError(str(e)) from None
    self._step += 1
    # Counted here, in the main process, because grain worker processes cannot share a
    # counter with it.
    self.skipped += int(np.sum(batch.pop('skipped', 0)))
    return batch

  @property
  def step(self) -> int:
    """The step whose batch `next()` returns."""
    return self._step

  def get_state(self) -> dict[str, Any]:
    return self.state_at(self._step)

  def state_at(self, step: int) -> dict[str, Any]:
    """The state of this stream positioned at `step` (the iterator itself does not move)."""
    return {'step': step, **self._fingerprint}

  def set_state(self, state: dict[str, Any]) -> None:
    for key, value in self._fingerprint.items():
      if state.get(key, value) != value:
        raise ValueError(f'Data iterator state has {key}={state[key]!r} but this run has '
                         f'{value!r}; the stream would not continue where it stopped.')
    self._inner.close()
    self._step = int(state['step'])
    self._inner = self._make(self._step)

  def start_prefetch(self) -> None:
    self._inner.start_prefetch()

  def close(self) -> None:
    self._inner.close()


class BatchPass:
  """One exact pass over a split: re-iterable, with a known number of batches."""

  def __init__(self, dataset: grain.IterDataset, num_batches: int):
    self._dataset = dataset
    self._num_batches = num_batches

  def __len__(self) -> int:
    return self._num_batches

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    iterator = iter(self._dataset)
    try:
      yield from iterator
    except DataError as e:
      raise DataError(str(e)) from None  # See TrainIterator.__next__.
    finally:
      iterator.close()


@dataclasses.dataclass(eq=False)
class Data:
  """A dataset ready to batch for one process; build it with `make_data`.

  Batches are dicts of numpy arrays: 'input' [B, ...] (NHWC images: float32 and normalized
  when held in memory, uint8 when decoded from files or records, normalized on the device
  by the model `on_device` returns; int32 token ids with 0 = pad; or float32 vectors),
  'label' int32 [B] (synthetic regression: float32 [B, num_classes] targets), for train 'index' int64 [B] (each example's index in the train split,
  checked and recorded by `pipeline.ledger` and not for the devices), and for eval 'mask'
  bool [B] (False on padding). B is the global batch divided by the process count.

  Attributes:
    train_size: examples in the train split (N).
    eval_size: examples in the eval split.
    num_classes: number of labels.
    input_shape: shape of one input, e.g. (28, 28, 1) or (max_len,).
    input_dtype: dtype of 'input'.
    label_names: label strings in id order.
    split_names: splits `split_batches` accepts.
    train_split: name of the split trained on.
    eval_split: name of the split `eval_batches` passes over.
    steps_per_epoch: N / global batch (batches straddle epochs, so not an integer).
    skipped: records dropped under data.on_bad_record='skip'.
    vectorizer: the fitted text vectorizer (None for images).
  """
  train_size: int
  eval_size: int
  num_classes: int
  input_shape: tuple[int, ...]
  input_dtype: np.dtype
  label_names: tuple[str, ...]
  split_names: tuple[str, ...]
  train_split: str
  eval_split: str
  steps_per_epoch: float
  skipped: int
  vectorizer: text.Vectorizer | None
  _name: str = dataclasses.field(repr=False)
  _kind: str = dataclasses.field(repr=False)
  _splits: dict[str, Any] = dataclasses.field(repr=False)
  _mean: np.ndarray | None = dataclasses.field(repr=False)
  _std: np.ndarray | None = dataclasses.field(repr=False)
  _seed: int = dataclasses.field(repr=False)
  _global_batch: int = dataclasses.field(repr=False)
  _eval_batch: int = dataclasses.field(repr=False)
  _process_index: int = dataclasses.field(repr=False)
  _process_count: int = dataclasses.field(repr=False)
  _crop_pad: int = dataclasses.field(repr=False)
  _flip: bool = dataclasses.field(repr=False)
  _crops: images.Crops = dataclasses.field(repr=False)
  _threads: int = dataclasses.field(repr=False)
  _workers: int = dataclasses.field(repr=False)
  _targets: int = dataclasses.field(default=0, repr=False)  # Float targets (0 = class ids).

  def __post_init__(self):
    self._order = _Order(self.train_size, self._seed)

  @property
  def per_process_batch_size(self) -> int:
    return self._global_batch // self._process_count

  def train_iter(self, start_step: int = 0) -> TrainIterator:
    """This process's train batches from step `start_step` on, forever.

    Supports grain's `get_state()`/`set_state()`; `train_iter(s)` equals `train_iter(0)`
    after `s` batches, for any process count (the elastic-resume path).
    """
    fingerprint = {'seed': self._seed, 'global_batch_size': self._global_batch,
                   'train_size': self.train_size}
    return TrainIterator(self._train_stream, start_step, fingerprint)

  def train_indices(self, positions: np.ndarray) -> np.ndarray:
    """The train-split index of the example at each position of the global train stream.

    Step k's global batch is positions [k*G, (k+1)*G), process p's block p of it (see the
    module docstring); this is the order `train_iter` reads, for any process.
    """
    return self._order.indices(np.asarray(positions, np.int64))

  def eval_batches(self) -> BatchPass:
    """One exact pass over the eval split (`eval_split`), padded and masked."""
    return self.split_batches(self.eval_split)

  def split_batches(self, name: str) -> BatchPass:
    """One exact pass over any split, e.g. 'validation' to pick a model, 'test' to report."""
    if name not in self._splits:
      raise ValueError(f'No split {name!r}; {self._name} has {", ".join(self.split_names)}.')
    split = self._splits[name]
    num_batches = -(-len(split) // self._eval_batch)
    dataset = grain.MapDataset.range(num_batches).map(
        lambda b: self._eval_batch_at(split, b))
    return BatchPass(dataset.to_iter_dataset(self._read_options()), num_batches)

  def preprocess(self, raw_inputs: Sequence[Any]) -> np.ndarray:
    """Model inputs for predict mode, through the same ops as eval.

    Args:
      raw_inputs: image file paths, PIL images or uint8 arrays (image data); strings
        (text data); float arrays of `input_shape` (synthetic).
    """
    if self._kind == 'text':
      return self.vectorizer([str(t) for t in raw_inputs])
    if self._kind == 'image':
      h, w, c = self.input_shape
      decoded = [images.decode(item, size=(h, w), channels=c, name=f'input {i}',
                               box=self._crops.eval_box())
                 for i, item in enumerate(raw_inputs)]
      return images.normalize(np.stack(decoded), self._mean, self._std)
    inputs = np.asarray(raw_inputs, np.float32)
    if inputs.shape[1:] != self.input_shape:
      raise DataError(f'inputs have shape {inputs.shape[1:]}, expected {self.input_shape}')
    return inputs

  def save_artifacts(self, directory: str) -> None:
    """Writes what evaluate and predict need to read data as training did.

    `vocabulary.json` (text only; `make_data(..., workdir=directory)` loads it) and
    `data_info.json` (label names, input shape and dtype, normalization statistics).
    """
    storage.make_dirs(directory)
    if self.vectorizer is not None:
      self.vectorizer.save(storage.join(directory, VOCABULARY_FILE))
    info = {'name': self._name, 'label_names': list(self.label_names),
            'input_shape': list(self.input_shape),
            'input_dtype': np.dtype(self.input_dtype).name,
            'mean': None if self._mean is None else self._mean.tolist(),
            'std': None if self._std is None else self._std.tolist()}
    storage.write_text(storage.join(directory, DATA_INFO_FILE), json.dumps(info, indent=2))

  def on_device(self, model: Any) -> Any:
    """`model` as the steps must call it: with the normalization that uint8 image inputs
    (decoded-image sources, `input_dtype` uint8) get on the device."""
    if self.input_dtype != np.uint8:
      return model
    if self._mean is None:
      scale, offset = np.full(self.input_shape[-1], 1 / 255, np.float32), 0.0
    else:
      scale, offset = 1.0 / (255.0 * self._std), -self._mean / self._std
    return on_device.NormalizedInput(model, scale, offset)

  @property
  def _per_example(self) -> bool:
    # Images decoded from files or records: the decode dominates, so each example is one
    # grain element (spread over the read threads), batched after. In-memory arrays are
    # cheaper to crop and flip a whole batch at a time with numpy.
    return not isinstance(self._splits[self.train_split], source_lib.ArraySplit)

  def _read_options(self, elements_per_batch: int = 1) -> grain.ReadOptions:
    # Two batches in flight per thread keep the threads busy without holding many batches
    # in memory.
    return grain.ReadOptions(num_threads=self._threads,
                             prefetch_buffer_size=2 * self._threads * elements_per_batch)

  def _train_stream(self, step: int) -> grain.DatasetIterator:
    if self._per_example:
      size = self.per_process_batch_size
      # Element k is example k % size of this process's batch k // size, so batch i of
      # this dataset is step `step + i`.
      dataset = grain.MapDataset.range(step * size, sys.maxsize).map(self._train_example)
      if self._workers:
        # mp_prefetch deals the elements to its workers round-robin and each batches its
        # own share, so there a batch must be one element (its examples read in turn).
        iter_dataset = dataset.batch(size).to_iter_dataset(self._read_options())
      else:
        iter_dataset = dataset.to_iter_dataset(self._read_options(size)).batch(size)
    else:
      dataset = grain.MapDataset.range(step, sys.maxsize).map(self._train_batch)
      iter_dataset = dataset.to_iter_dataset(self._read_options())
    if self._workers:
      iter_dataset = iter_dataset.mp_prefetch(
          grain.MultiprocessingOptions(num_workers=self._workers))
    return iter(iter_dataset)

  def _train_batch(self, step: int) -> dict[str, np.ndarray]:
    size = self.per_process_batch_size
    start = step * self._global_batch + self._process_index * size
    return self._train_examples(np.arange(start, start + size, dtype=np.int64))

  def _train_example(self, k: int) -> dict[str, np.ndarray]:
    step, slot = divmod(k, self.per_process_batch_size)
    position = step * self._global_batch + self._process_index * self.per_process_batch_size
    example = self._train_examples(np.array([position + slot], np.int64))
    return {key: value[0] for key, value in example.items()}

  def _train_examples(self, positions: np.ndarray) -> dict[str, np.ndarray]:
    """The train examples at these global stream positions, each a function of (seed,
    position) alone, so a batch is the same read whole or one example at a time."""
    indices = self._order.indices(positions)
    keys = images.example_keys(self._seed, positions)
    boxes = [self._crops.train_box(key) for key in keys] if self._crops.inception else None
    inputs, labels, ok = _read(self._splits[self.train_split], indices, boxes, substitute=True)
    if self._kind == 'image':
      inputs = images.augment(inputs, seed=self._seed, positions=positions,
                              pad=self._crop_pad, flip=self._flip, keys=keys)
    return {'input': self._finish(inputs), 'label': self._labels(labels), 'index': indices,
            'skipped': (~ok).astype(np.int32)}  # Taken off by TrainIterator.

  def _eval_batch_at(self, split, batch: int) -> dict[str, np.ndarray]:
    size = self._eval_batch // self._process_count
    start = batch * self._eval_batch + self._process_index * size
    positions = np.arange(start, start + size, dtype=np.int64)
    mask = positions < len(split)
    out = {'input': np.zeros((size, *self.input_shape), self.input_dtype),
           'label': self._labels(np.zeros((size, self._targets) if self._targets else size)),
           'mask': mask}
    if mask.any():
      box = self._crops.eval_box()
      # A file that turns out unreadable (on_bad_record=skip) is left out of the pass, as
      # if it were padding.
      inputs, labels, ok = _read(split, positions[mask], box and [box] * int(mask.sum()),
                                 substitute=False)
      out['input'][mask] = self._finish(inputs)
      out['label'][mask] = labels
      out['mask'][mask] = ok
    return out

  def _labels(self, labels: np.ndarray) -> np.ndarray:
    return labels.astype(np.float32 if self._targets else np.int32, copy=False)

  def _finish(self, inputs: np.ndarray) -> np.ndarray:
    if self.input_dtype == np.uint8:
      return inputs  # Normalized on the device (see on_device).
    if self._kind == 'image':
      return images.normalize(inputs, self._mean, self._std)
    return inputs.astype(self.input_dtype, copy=False)


def _read(split, indices: np.ndarray, boxes, *,
          substitute: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(inputs, labels, ok) of `indices`; ok is False only where on_bad_record=skip skipped."""
  if getattr(split, 'skip_bad', False):
    return split.read_skipping(indices, boxes, substitute=substitute)
  inputs, labels = split.read(indices, boxes) if boxes else split.read(indices)
  return inputs, labels, np.ones(len(indices), bool)


def _select_classes(splits: dict[str, Any], label_names: tuple[str, ...],
                    classes: tuple[int, ...]) -> tuple[dict[str, Any], tuple[str, ...]]:
  """Keeps the examples of `classes` (config.data.classes), relabelled 0..len-1 in order.

  Transfer learning pretrains on some classes and fine-tunes on the others.
  """
  if len(set(classes)) != len(classes) or not all(0 <= c < len(label_names) for c in classes):
    raise ValueError(f'config.data.classes={classes} is invalid: expected distinct label '
                     f'ids in 0..{len(label_names) - 1}.')
  new_id = np.full(len(label_names), -1, np.int32)
  new_id[list(classes)] = np.arange(len(classes))
  selected = {}
  for name, split in splits.items():
    if not hasattr(split, 'labels'):
      raise ValueError(f'config.data.classes is not supported for split {name!r} '
                       f'({type(split).__name__}): its labels are only known when read.')
    keep = np.flatnonzero(new_id[split.labels] >= 0)
    fields = {'labels': new_id[split.labels[keep]]}
    for field in ('inputs', 'paths', 'texts'):
      if hasattr(split, field):
        values = getattr(split, field)
        fields[field] = (values[keep] if isinstance(values, np.ndarray)
                         else type(values)(values[i] for i in keep))
    selected[name] = dataclasses.replace(split, **fields)
  return selected, tuple(label_names[c] for c in classes)


def make_data(config, *, process_index: int, process_count: int,
              workdir: str | None = None) -> Data:
  """Reads and checks `config.data`'s dataset and returns this process's view of it.

  Args:
    config: the run config (data.*, train.global_batch_size, eval.batch_size, seed).
    process_index: this process, in [0, process_count).
    process_count: number of processes sharing each global batch.
    workdir: where a text vocabulary is reused from (if present) or saved to (process 0).

  Raises:
    DataError: a file or record is unusable (the message names it).
    ValueError: a config value does not fit the data (the message names the key).
  """
  d = config.data
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is not in [0, {process_count})')
  for key in ('train.global_batch_size', 'eval.batch_size'):
    section, name = key.split('.')
    if config[section][name] % process_count:
      raise ValueError(f'config.{key}={config[section][name]} is invalid: must be divisible '
                       f'by the {process_count} processes.')
  source = sources.make_source(config, source_lib.Run(workdir, process_index))
  splits, label_names = dict(source.splits), tuple(source.label_names)
  if d.classes:
    splits, label_names = _select_classes(splits, label_names, tuple(d.classes))
  if len(label_names) != d.num_classes:
    raise ValueError(f'config.data.num_classes={d.num_classes} is invalid: {d.name} has '
                     f'{len(label_names)} labels ({", ".join(label_names)}).')
  vectorizer = None
  if source.kind == 'text':
    vectorizer = _vectorizer(config, splits[source.train_split].texts, workdir, process_index)
    splits = {name: source_lib.ArraySplit(vectorizer(split.texts), split.labels)
              for name, split in splits.items()}
  train = splits[source.train_split]
  if len(train) < config.train.global_batch_size:
    raise DataError(f'{source.origin}: {len(train)} training examples, fewer than one '
                    f'global batch (config.train.global_batch_size='
                    f'{config.train.global_batch_size})')
  for name, split in splits.items():
    if not len(split):
      raise DataError(f'{source.origin}: split {name!r} is empty')
  mean = std = None
  if source.kind == 'image' and d.normalize and d.mean:
    mean, std = np.array(d.mean, np.float32), np.array(d.std, np.float32)
  elif source.kind == 'image' and d.normalize:
    mean, std = _image_stats(config, train, workdir, process_index)
  if source.kind == 'image':
    # Decoded images stay uint8 to the devices; in-memory ones (Fashion-MNIST) are
    # normalized here, as their golden figures were measured.
    decoded = not isinstance(train, source_lib.ArraySplit)
    input_shape, input_dtype = train.shape, np.dtype(np.uint8 if decoded else np.float32)
  elif source.kind == 'text':
    input_shape, input_dtype = (d.max_len,), np.dtype(np.int32)
  else:
    input_shape, input_dtype = train.shape, np.dtype(np.float32)
  return Data(
      train_size=len(train), eval_size=len(splits[source.eval_split]),
      num_classes=d.num_classes, input_shape=tuple(input_shape), input_dtype=input_dtype,
      label_names=label_names, split_names=tuple(splits),
      train_split=source.train_split, eval_split=source.eval_split,
      steps_per_epoch=len(train) / config.train.global_batch_size,
      skipped=len(source.skipped), vectorizer=vectorizer,
      _name=d.name, _kind=source.kind, _splits=splits, _mean=mean, _std=std,
      _seed=config.seed, _global_batch=config.train.global_batch_size,
      _eval_batch=config.eval.batch_size, _process_index=process_index,
      _process_count=process_count, _crop_pad=d.random_crop_pad, _flip=d.random_flip,
      _crops=images.Crops(d.image_size, d.inception_crop, tuple(d.inception_area),
                          tuple(d.inception_aspect), d.inception_attempts,
                          d.eval_center_crop, d.crop_padding),
      _targets=d.num_classes if d.name == 'synthetic' and d.synthetic_task == 'regression'
      else 0,
      _threads=d.prefetch_threads, _workers=default_workers(train, os.cpu_count() or 1)
      if d.num_workers < 0 else d.num_workers)


def default_workers(train, cores: int) -> int:
  """data.num_workers=-1: worker processes for this train split on a host of `cores`.

  In-memory splits need none (a batch is a numpy gather). Decoded images do: their read
  threads share one interpreter lock, and two of them kept 0.7 of a core busy on the
  2-core development host (bench/input.py --imagenet); there too, worker processes were no
  faster than threads, since each core was already taken. So: none below 8 cores, else
  half the cores, leaving the rest to the training loop and XLA's host threads (a rule of
  thumb, not measured on a large host).
  """
  if isinstance(train, source_lib.ArraySplit) or cores < 8:
    return 0
  return min(cores // 2, 32)


def _image_stats(config, train, workdir: str | None,
                 process_index: int) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and std of the train images: of all of them when held in memory,
  else of a seeded sample, decoded once per run and kept in the workdir (STATS_FILE)."""
  if isinstance(train, source_lib.ArraySplit):
    return images.channel_stats(train.inputs)

  def compute() -> list[list[float]]:
    rng = np.random.default_rng(source_lib.SPLIT_SEED)
    sample = np.sort(rng.permutation(len(train))[:STATS_SAMPLE])
    if getattr(train, 'skip_bad', False):
      pixels, _, ok = train.read_skipping(sample, substitute=False)
      pixels = pixels[ok]
    else:
      pixels = train.read(sample)[0]
    return [s.tolist() for s in images.channel_stats(pixels)]

  d = config.data
  key = {k: d[k] for k in ('name', 'path', 'eval_path', 'tfds_name', 'tfds_data_dir',
                           'train_split', 'label_pattern', 'classes', 'image_size',
                           'channels', 'validation_fraction')}
  mean, std = run_files.shared(workdir, STATS_FILE, {**key, 'train_size': len(train)},
                               compute, process_index=process_index)
  return np.array(mean, np.float32), np.array(std, np.float32)


def _vectorizer(config, texts: list[str], workdir: str | None,
                process_index: int) -> text.Vectorizer:
  """Loads the run's vocabulary from workdir, or fits it on the train texts and saves it."""
  d = config.data
  path = storage.join(workdir, VOCABULARY_FILE) if workdir else None
  if path and storage.exists(path):
    vectorizer = text.Vectorizer.load(path)
    for key in ('vocab_size', 'max_len', 'remove_stopwords'):
      if getattr(vectorizer, key) != d[key]:
        raise DataError(f'{path}: fitted with data.{key}={getattr(vectorizer, key)!r} but '
                        f'the config says {d[key]!r}; delete the file to refit')
    return vectorizer
  vectorizer = text.Vectorizer.fit(texts, vocab_size=d.vocab_size, max_len=d.max_len,
                                   remove_stopwords=d.remove_stopwords)
  # Every process fits the same vocabulary (same texts, deterministic ties), so only one
  # needs to write it.
  if path and process_index == 0:
    storage.make_dirs(workdir)
    vectorizer.save(path)
  return vectorizer
