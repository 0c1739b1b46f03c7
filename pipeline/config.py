"""The configuration schema: every key, its default, and `validate()`.

Every key the pipeline reads is declared here once, with its default and a one-line comment.
Config files in `configs/` start from `base_config()` and change what they need; the code
never calls `config.get(key, default)`, so this file is the whole schema. `validate()` runs
before anything is compiled and names the offending key and the allowed values.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import ml_collections

MODELS = ('mlp', 'cnn', 'cnn_bn', 'resnet18', 'resnet34', 'resnet50', 'resnet_small', 'lstm',
          'ngrams')
OPTIMIZERS = (
    'adabelief', 'adafactor', 'adagrad', 'adam', 'adamw', 'dpsgd', 'fromage', 'lamb', 'lars',
    'noisy_sgd', 'optimistic_gradient_descent', 'radam', 'rmsprop', 'sgd', 'sm3', 'yogi')
SCHEDULES = ('constant', 'warmup_cosine', 'piecewise')
DTYPES = ('float32', 'bfloat16')
LSTM_POOLINGS = ('last', 'mean', 'max')  # Over time: last real step, or over real tokens.
PARALLELISM = ('jit', 'pmap')
FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'


class _Section(ml_collections.ConfigDict):
  """A section of the schema that names itself in ml_collections' type errors.

  A config file assigning `config.model.width = 'x'` hits ml_collections' type check, whose
  message names only 'width'; with a dozen sections that is not enough to find the line.
  """

  def __init__(self, *args, section: str = '', **kwargs):
    # ml_collections builds its copies as type(self)(dict, type_safe=...): keyword only.
    super().__init__(*args, **kwargs)
    # Outside the fields: not a config key, never saved, not seen by to_dict().
    object.__setattr__(self, '_section', section)

  def __setitem__(self, key, value):
    try:
      super().__setitem__(key, value)
    except TypeError as e:
      # Copies made by ml_collections itself (copy_and_resolve_references) lose the name
      # and report the bare key, as ml_collections does.
      section = self.__dict__.get('_section', '')
      name = f'{section}.{key}' if section else key
      expected = type(self._fields[key]).__name__ if key in self._fields else '?'
      raise TypeError(f'config.{name}={value!r} is invalid: expected {expected}, got '
                      f'{type(value).__name__} ({e})') from None


def base_config() -> ml_collections.ConfigDict:
  """Returns the full schema with defaults; config files override a few keys."""
  c = _Section()
  c.seed = 0  # Seeds parameter init, dropout, data order and augmentation.

  c.data = _Section(section='data')
  c.data.name = 'fashion_mnist'  # One of pipeline.data.sources.SOURCES.
  c.data.path = FASHION_MNIST_DIR  # IDX dir, image folder root or CSV file, by data.name.
  c.data.eval_path = ''  # image_folder/csv_text: separate eval folder/file ('' = split path).
  c.data.tfds_name = ''  # tfds: dataset name, e.g. 'cifar10' or 'imdb_reviews'.
  c.data.tfds_data_dir = ''  # tfds: data_dir ('' = TFDS default; a gs:// path works on TPU).
  c.data.train_split = 'train'  # tfds/rotten_tomatoes: split to train on.
  c.data.eval_split = 'test'  # tfds/rotten_tomatoes: split evaluated (validation or test).
  c.data.validation_fraction = 0.1  # Share held out for validation where no split exists.
  c.data.test_fraction = 0.1  # rotten_tomatoes/csv_text: share held out as the test split.
  # Number of labels; must match the dataset (or data.classes). Regression: of targets.
  c.data.num_classes = 10
  c.data.classes = ()  # Keep only these label ids, relabelled 0..n-1 (() = all).
  c.data.image_size = 0  # Resize images to this square size (0 = keep native size).
  c.data.channels = 1  # Image channels after decoding: 1 (gray) or 3 (RGB).
  c.data.label_pattern = ''  # image_folder: regex whose group 1 is the label in a filename.
  c.data.label_names = ()  # Label strings in id order ('' tuple = sorted names found).
  c.data.text_column = 'text'  # csv_text: column holding the text.
  c.data.label_column = 'label'  # csv_text: column holding the label string.
  c.data.on_bad_record = 'error'  # 'error' stops naming the record; 'skip' skips and counts.
  c.data.random_crop_pad = 0  # Train augmentation: pad by this many pixels, random crop back.
  c.data.random_flip = False  # Train augmentation: random horizontal flip.
  c.data.normalize = True  # Scale to [0,1] then subtract the dataset mean, divide by std.
  c.data.mean = ()  # normalize: per-channel mean on the [0, 1] scale (() = measure the data).
  c.data.std = ()  # normalize: per-channel std with data.mean (() = measure the data).
  # Train: Inception random-resized crop to image_size (image_folder and tfds images).
  c.data.inception_crop = False
  c.data.inception_area = (0.08, 1.0)  # inception_crop: range of the crop's share of the area.
  c.data.inception_aspect = (3 / 4, 4 / 3)  # inception_crop: range of crop width / height.
  c.data.inception_attempts = 10  # inception_crop: draws before the center-crop fallback.
  # Eval and predict: central crop, then resize to image_size (False: squash-resize).
  c.data.eval_center_crop = False
  c.data.crop_padding = 32  # Center crop side = min(h, w) * image_size / (image_size + this).
  c.data.vocab_size = 20000  # Text: vocabulary size including the pad and OOV ids.
  c.data.max_len = 64  # Text: pad or truncate every sequence to this many tokens.
  c.data.remove_stopwords = False  # Text: drop English stop words before counting tokens.
  c.data.synthetic_train_size = 4096  # synthetic: number of training examples.
  c.data.synthetic_eval_size = 1024  # synthetic: number of eval examples.
  c.data.synthetic_shape = (28, 28, 1)  # synthetic: shape of one input.
  # synthetic: 'classification' (class labels) or 'regression' (num_classes float targets).
  c.data.synthetic_task = 'classification'
  # grain worker processes (0 = read in the main process's threads; -1 = by the host: see
  # pipeline.data.pipeline.default_workers).
  c.data.num_workers = -1
  c.data.prefetch_threads = 2  # grain read threads feeding the batcher in the main process.
  # Train batches put on the devices ahead of the step, from a thread (0 = in the loop).
  c.data.device_prefetch = 2

  c.model = _Section(section='model')
  c.model.name = 'cnn'  # One of MODELS, or a model of your own: 'package.module:Class'.
  # 'package.module:Class' models: the class's keyword arguments. A config file declares
  # them (config.model.kwargs = {'width': 32}); --config.model.kwargs.width=64 then works.
  c.model.kwargs = _Section(section='model.kwargs')
  c.model.activation = 'relu'  # Built-in models: every hidden activation (models/activations.py).
  c.model.dtype = 'float32'  # Compute dtype, one of DTYPES; parameters stay float32.
  c.model.width = 64  # ResNet: channels of the first stage (64 for the standard nets).
  c.model.stage_sizes = (1, 1, 1)  # resnet_small: residual blocks per stage.
  c.model.stem = 'small'  # ResNet stem: 'small' (3x3 conv) or 'imagenet' (7x7/2 + max-pool).
  c.model.zero_init_residual = False  # ResNet: each block's last BatchNorm scale starts at 0.
  c.model.dropout_rate = 0.5  # cnn_bn, ngrams: dropout before the classifier.
  c.model.hidden_size = 256  # mlp/cnn: width of the dense hidden layer.
  c.model.embed_dim = 128  # lstm, ngrams: embedding size.
  c.model.lstm_sizes = (128,)  # lstm: hidden size of each stacked LSTM layer.
  c.model.lstm_dense_size = 0  # lstm: dense+relu between stacked layers (0 = none).
  c.model.lstm_bidirectional = False  # lstm: each layer also reads the sequence backwards.
  c.model.lstm_pooling = 'last'  # lstm: one of LSTM_POOLINGS over the last layer's outputs.
  c.model.lstm_dropout_rate = 0.0  # lstm: dropout on the embeddings and before the head.
  c.model.ngram_buckets = 2**18  # ngrams: hashed bigram embeddings (0 = unigrams only).

  c.optimizer = _Section(section='optimizer')
  c.optimizer.name = 'adamw'  # One of OPTIMIZERS.
  c.optimizer.learning_rate = 1e-3  # Peak learning rate.
  c.optimizer.schedule = 'warmup_cosine'  # One of SCHEDULES.
  c.optimizer.warmup_steps = 100  # warmup_cosine: linear warmup steps from 0.
  c.optimizer.end_lr_fraction = 0.0  # warmup_cosine: final lr as a fraction of the peak.
  c.optimizer.boundaries = ()  # piecewise: steps at which the lr is multiplied ...
  c.optimizer.scales = ()  # ... by these factors (same length as boundaries).
  c.optimizer.weight_decay = 0.0  # Weight decay on kernels (not biases/norm scales).
  # True: L2 added to the gradient before momentum (coupled, the SGD recipes' weight decay);
  # False: decoupled, added to the update after the optimizer's own steps.
  c.optimizer.weight_decay_coupled = False
  c.optimizer.momentum = 0.9  # sgd/lars/rmsprop/noisy_sgd momentum (0 = none).
  c.optimizer.nesterov = False  # sgd: Nesterov momentum.
  c.optimizer.b1 = 0.9  # Adam-family first moment decay.
  c.optimizer.b2 = 0.999  # Adam-family second moment decay.
  c.optimizer.eps = 1e-8  # Adam-family epsilon.
  c.optimizer.clip_grad_norm = 0.0  # Clip gradients to this global norm (0 = off).
  c.optimizer.grad_accum_steps = 1  # Accumulate this many micro-batches per update.
  c.optimizer.label_smoothing = 0.0  # Label smoothing of the classification losses.
  c.optimizer.dp_l2_clip = 1.0  # dpsgd: per-example gradient clipping norm.
  c.optimizer.dp_noise_multiplier = 1.1  # dpsgd: noise stddev / clip norm.
  c.optimizer.noise_eta = 0.01  # noisy_sgd: noise variance scale.

  c.loss = _Section(section='loss')
  c.loss.name = 'softmax_cross_entropy'  # One of losses.NAMES; its metric follows it.
  c.loss.huber_delta = 1.0  # huber: where the loss turns from quadratic to linear.

  c.train = _Section(section='train')
  c.train.global_batch_size = 128  # Examples per step over all processes and devices.
  # Either duration may change on resume: that moves where the run stops, not its lr
  # schedule, which keeps the length the run started with (checkpoint meta
  # 'schedule_steps', with a warning) and past its end holds its final value.
  c.train.num_epochs = 0.0  # Train this many epochs (0 = use num_steps); converted once.
  c.train.num_steps = 1000  # Train steps when num_epochs is 0.
  c.train.log_every_steps = 50  # Write train metrics every this many steps.
  c.train.eval_every_steps = 500  # Full evaluation every this many steps (and at the end).
  # Optimizer steps per compiled call (a scan over that many stacked batches): fewer
  # dispatches for small models. Calls end at every eval and checkpoint step and at the
  # end, so a call may run fewer; logs, evals, saves and resumes are as with 1.
  c.train.steps_per_call = 1

  c.eval = _Section(section='eval')
  c.eval.batch_size = 1000  # Global eval batch; the last batch is padded and masked.
  c.eval.checkpoint_step = -1  # evaluate mode: step to restore (-1 = best, else newest).
  c.eval.final_split = ''  # Also score the model chosen on the eval split on this split.

  c.predict = _Section(section='predict')
  c.predict.input = ''  # Image file/folder, or text file (one text per line; '-' = stdin).
  c.predict.output = ''  # JSON-lines output file ('' = WORKDIR/predictions.jsonl).
  c.predict.batch_size = 64  # Inputs classified per step (padded to the device count).

  c.early_stopping = _Section(section='early_stopping')
  c.early_stopping.metric = ''  # Eval metric to watch, e.g. 'eval/loss' ('' = off).
  c.early_stopping.mode = 'min'  # 'min' or 'max' for the metric.
  c.early_stopping.patience = 3  # Evals without improvement before stopping.
  c.early_stopping.min_delta = 0.0  # Smallest change that counts as an improvement.

  c.profile = _Section(section='profile')
  c.profile.start_step = -1  # First step of a jax.profiler trace window (-1 = off).
  c.profile.num_steps = 5  # Steps traced from start_step.
  c.profile.server_port = 0  # Start the profiler server on this port (0 = off).

  c.mesh = _Section(section='mesh')
  c.mesh.data = -1  # Devices on the data axis (-1 = the rest).
  c.mesh.fsdp = 1  # Devices on the fsdp axis (-1 = the rest).
  c.mesh.dcn_data = 1  # Slices (processes where there are none) the data axis spans; 1 = one.
  c.parallelism = 'jit'  # One of PARALLELISM: jit over a Mesh, or the pmap fallback.
  c.fsdp = False  # Shard params and optimizer state over the fsdp axis.
  # fsdp: arrays of fewer elements stay replicated. Each sharded array costs collectives
  # every step (gather before use, reduce after), whose latency outweighs the update a
  # small one saves: 8 fake CPU devices, the default CNN, 2,650 examples/s with only its
  # 802k-element dense kernel sharded against 1,990 with every array sharded.
  c.fsdp_min_size = 2**16

  c.checkpoint = _Section(section='checkpoint')
  c.checkpoint.every_steps = 500  # Save every this many steps (and at the end).
  c.checkpoint.max_to_keep = 3  # Newest checkpoints kept.
  c.checkpoint.best_metric = 'eval/accuracy'  # Metric that picks the best checkpoint.
  c.checkpoint.best_mode = 'max'  # 'max' or 'min' for best_metric.
  c.checkpoint.async_save = True  # Save in the background while training goes on.
  # Async, one process: copy the state on the devices and hand the copy to Orbax from a
  # save thread, so the loop does not wait for the host transfer. Holds a second copy of
  # the state in device memory until it is on the host; False when it does not fit twice.
  c.checkpoint.device_snapshot = True
  # On an error, how long the exit waits for a save in flight to commit (a dead peer
  # would make it wait forever); past it the step is logged as lost.
  c.checkpoint.exit_wait_s = 120.0
  c.checkpoint.allow_config_change = False  # Resume even if non-allow-listed keys changed.

  c.watchdog = _Section(section='watchdog')
  # Exit (status 75) after this many seconds without progress (step, eval batch,
  # checkpoint phase), dumping every thread's stack; must exceed the compile time. 0 = off.
  c.watchdog.timeout_s = 1800.0

  c.init_from = ''  # Checkpoint dir whose params initialize this run ('' = fresh init).
  c.init_from_step = -1  # Step of init_from to load (-1 = newest).
  c.init_prefixes = ()  # Param path prefixes taken from init_from (empty = all that fit).
  c.freeze = ()  # Param path prefixes that get zero updates (e.g. the backbone).

  c.debug_nans = False  # Turn on jax_debug_nans (slow; finds the op that makes a NaN).
  c.enable_x64 = False  # Turn on 64-bit types.
  return c


def get_config() -> ml_collections.ConfigDict:
  """This file is itself a config file: the schema's defaults. It is `--config`'s default,
  which evaluate and predict modes replace by the config saved in the workdir."""
  return base_config()


def from_saved(saved: dict[str, Any]) -> ml_collections.ConfigDict:
  """A config saved as JSON (checkpoint metadata) back as a ConfigDict of the schema.

  Keys added to the schema since the run saved it take their defaults; JSON has no tuples,
  and every sequence in the schema is one.
  """
  def restore(value):
    if isinstance(value, dict):
      return {k: restore(v) for k, v in value.items()}
    return tuple(map(restore, value)) if isinstance(value, list) else value
  config = base_config()
  config.update(restore(saved))
  return config


def _fail(key: str, value: Any, expected: str) -> None:
  raise ValueError(f'config.{key}={value!r} is invalid: {expected}.')


def _check_choice(config, key: str, allowed: Sequence[str]) -> None:
  value = _lookup(config, key)
  if value not in allowed:
    _fail(key, value, f'allowed values are {", ".join(map(str, allowed))}')


def _lookup(config, key: str) -> Any:
  node = config
  for part in key.split('.'):
    node = node[part]
  return node


def _check_positive(config, *keys: str) -> None:
  for key in keys:
    value = _lookup(config, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      _fail(key, value, f'expected a number, got {type(value).__name__}')
    if value <= 0:
      _fail(key, value, 'must be > 0')


def _check_non_negative(config, *keys: str) -> None:
  for key in keys:
    value = _lookup(config, key)
    if value < 0:
      _fail(key, value, 'must be >= 0')


def _check_types(config, reference, prefix: str = '') -> None:
  """Config files may assign whole values; catch a wrong type the schema would reject."""
  for key, default in reference.items():
    value = config[key]
    name = f'{prefix}{key}'
    if isinstance(default, ml_collections.ConfigDict):
      _check_types(value, default, name + '.')
    elif isinstance(default, bool):
      if not isinstance(value, bool):
        _fail(name, value, 'expected a bool')
    elif isinstance(default, float):
      if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(name, value, 'expected a number')
    elif isinstance(default, int):
      if isinstance(value, bool) or not isinstance(value, int):
        _fail(name, value, 'expected an int')
    elif isinstance(default, str):
      if not isinstance(value, str):
        _fail(name, value, 'expected a string')
    elif isinstance(default, tuple):
      if not isinstance(value, (tuple, list)):
        _fail(name, value, 'expected a tuple')


def mesh_shape(config, num_devices: int) -> tuple[int, int]:
  """Resolves (data, fsdp) with -1 meaning 'the rest'; raises naming the mesh keys."""
  data, fsdp = config.mesh.data, config.mesh.fsdp
  for key, size in (('mesh.data', data), ('mesh.fsdp', fsdp)):
    if size == 0 or size < -1:
      _fail(key, size, 'must be a positive size or -1 (the rest)')
  if data == -1 and fsdp == -1:
    _fail('mesh', (data, fsdp), 'at most one of mesh.data and mesh.fsdp may be -1')
  if data == -1:
    data = num_devices // fsdp if num_devices % fsdp == 0 else 0
  if fsdp == -1:
    fsdp = num_devices // data if num_devices % data == 0 else 0
  if data * fsdp != num_devices:
    _fail('mesh', (config.mesh.data, config.mesh.fsdp),
          f'mesh.data x mesh.fsdp must multiply to the {num_devices} devices')
  return data, fsdp


def validate(config, *, num_devices: int, num_processes: int) -> None:
  """Fails fast, naming the key and what is allowed, before anything is compiled."""
  _check_types(config, base_config())
  # Imported here: the data layer loads grain and PIL, which importing a config should not.
  from pipeline.data import sources  # pylint: disable=g-import-not-at-top
  _check_choice(config, 'data.name', tuple(sources.SOURCES))
  _check_choice(config, 'model.dtype', DTYPES)
  _check_choice(config, 'model.stem', ('small', 'imagenet'))
  _check_choice(config, 'model.lstm_pooling', LSTM_POOLINGS)
  _check_choice(config, 'optimizer.name', OPTIMIZERS)
  _check_choice(config, 'optimizer.schedule', SCHEDULES)
  _check_choice(config, 'parallelism', PARALLELISM)
  _check_choice(config, 'checkpoint.best_mode', ('max', 'min'))
  _check_choice(config, 'data.on_bad_record', ('error', 'skip'))
  _check_choice(config, 'early_stopping.mode', ('max', 'min'))
  _check_choice(config, 'data.channels', (1, 3))
  _check_positive(
      config, 'data.num_classes', 'train.global_batch_size', 'train.log_every_steps',
      'train.eval_every_steps', 'train.steps_per_call', 'eval.batch_size',
      'checkpoint.every_steps', 'checkpoint.max_to_keep', 'optimizer.learning_rate',
      'checkpoint.exit_wait_s',
      'optimizer.grad_accum_steps', 'data.vocab_size', 'data.max_len', 'model.width',
      'model.hidden_size', 'model.embed_dim', 'predict.batch_size', 'early_stopping.patience',
      'profile.num_steps', 'optimizer.dp_l2_clip', 'data.synthetic_train_size',
      'data.synthetic_eval_size', 'loss.huber_delta')
  # Counts, sizes, rates and strengths where 0 means none or off, and below 0 means nothing.
  _check_non_negative(
      config, 'optimizer.warmup_steps', 'optimizer.clip_grad_norm',
      'optimizer.weight_decay', 'optimizer.label_smoothing', 'optimizer.momentum',
      'optimizer.end_lr_fraction', 'optimizer.eps', 'optimizer.dp_noise_multiplier',
      'optimizer.noise_eta', 'early_stopping.min_delta', 'data.random_crop_pad',
      'data.image_size', 'data.prefetch_threads',
      'data.validation_fraction', 'data.test_fraction', 'model.dropout_rate',
      'model.lstm_dense_size', 'model.lstm_dropout_rate', 'model.ngram_buckets',
      'profile.server_port', 'watchdog.timeout_s', 'fsdp_min_size')
  _check_model(config)
  _check_loss(config)
  _check_metrics(config)
  _check_dpsgd(config)
  _check_image_recipe(config)
  if config.data.num_workers < -1:
    _fail('data.num_workers', config.data.num_workers, 'must be >= 0, or -1 for the default')
  if config.data.device_prefetch < 0:
    _fail('data.device_prefetch', config.data.device_prefetch, 'must be >= 0 (0 = no thread)')
  if config.train.num_epochs < 0:
    _fail('train.num_epochs', config.train.num_epochs, 'must be >= 0 (0 = use num_steps)')
  if config.train.num_epochs == 0:
    _check_positive(config, 'train.num_steps')
  if len(config.optimizer.boundaries) != len(config.optimizer.scales):
    _fail('optimizer.scales', config.optimizer.scales,
          f'needs one scale per boundary {tuple(config.optimizer.boundaries)}')
  if not all(s > 0 for s in config.model.lstm_sizes) or not config.model.lstm_sizes:
    _fail('model.lstm_sizes', config.model.lstm_sizes, 'expected one or more positive sizes')
  for key in ('dropout_rate', 'lstm_dropout_rate'):
    if config.model[key] >= 1:
      _fail(f'model.{key}', config.model[key], 'must be below 1 (1 would drop every feature)')

  data_par, fsdp = mesh_shape(config, num_devices)
  dcn = config.mesh.dcn_data
  if dcn < 1:
    _fail('mesh.dcn_data', dcn, 'must be >= 1 (1 = the data axis spans one slice)')
  if data_par % dcn or num_processes % dcn:
    _fail('mesh.dcn_data', dcn, f'must divide the data axis ({data_par} devices) and the '
          f'{num_processes} processes: each slice or process takes an equal block')
  batch_axes = data_par * fsdp  # Batches are sharded over both mesh axes.
  for key in ('train.global_batch_size', 'eval.batch_size'):
    value = _lookup(config, key)
    if value % num_processes:
      _fail(key, value, f'must be divisible by the {num_processes} processes')
    if value % batch_axes:
      _fail(key, value, f'must be divisible by the {batch_axes} data-parallel devices')
  micro = config.train.global_batch_size // config.optimizer.grad_accum_steps
  if config.train.global_batch_size % config.optimizer.grad_accum_steps or micro % batch_axes:
    _fail('optimizer.grad_accum_steps', config.optimizer.grad_accum_steps,
          f'global batch {config.train.global_batch_size} must split into that many micro-'
          f'batches, each divisible by the {batch_axes} data-parallel devices')

  name = config.data.name
  if name == 'fashion_mnist':
    _check_path(config, 'data.path', directory=True,
                hint='install it with: apt-get install dataset-fashion-mnist')
  elif name in ('image_folder', 'csv_text'):
    _check_path(config, 'data.path', directory=name == 'image_folder')
    if config.data.eval_path:
      _check_path(config, 'data.eval_path', directory=name == 'image_folder')
  elif name == 'tfds' and not config.data.tfds_name:
    _fail('data.tfds_name', '', 'name the TFDS dataset, e.g. cifar10')


def _check_image_recipe(config) -> None:
  """The crops and fixed statistics of the ImageNet recipe, each checked by name."""
  d = config.data
  for key in ('inception_crop', 'eval_center_crop'):
    if d[key] and (d.name not in ('image_folder', 'tfds') or not d.image_size):
      _fail(f'data.{key}', True, 'needs images of their own sizes (data.name image_folder '
            'or tfds) and data.image_size > 0 to resize the crop to')
  low, high = (tuple(d.inception_area) + (0, 0))[:2]
  if len(d.inception_area) != 2 or not 0 < low <= high <= 1:
    _fail('data.inception_area', d.inception_area, 'expected (low, high), 0 < low <= high <= 1')
  low, high = (tuple(d.inception_aspect) + (0, 0))[:2]
  if len(d.inception_aspect) != 2 or not 0 < low <= high:
    _fail('data.inception_aspect', d.inception_aspect, 'expected (low, high), 0 < low <= high')
  if d.inception_attempts < 1:
    _fail('data.inception_attempts', d.inception_attempts, 'must be >= 1')
  if d.crop_padding < 0:
    _fail('data.crop_padding', d.crop_padding, 'must be >= 0')
  if bool(d.mean) != bool(d.std):
    _fail('data.mean' if d.std else 'data.std', (), 'set data.mean and data.std together')
  for key in ('mean', 'std'):
    if d[key] and len(d[key]) != d.channels:
      _fail(f'data.{key}', d[key], f'needs one value per channel (data.channels={d.channels})')
  if d.std and min(d.std) <= 0:
    _fail('data.std', d.std, 'every value must be > 0')


def _check_metrics(config) -> None:
  """The metrics that pick the best checkpoint and steer early stopping must be ones the
  run's evaluation writes; a typo would surface as a KeyError deep inside Orbax."""
  # Imported here: it loads Flax, which importing a config file should not.
  from pipeline import steps  # pylint: disable=g-import-not-at-top
  produced = steps.eval_metric_names(task=_loss_task(config))
  _check_choice(config, 'checkpoint.best_metric', produced)
  if config.early_stopping.metric:
    _check_choice(config, 'early_stopping.metric', produced)


def _check_model(config) -> None:
  """A built-in model by name, or an importable class that takes `model.kwargs`."""
  from pipeline.models import activations  # pylint: disable=g-import-not-at-top  # Flax.
  from pipeline.models import imported  # pylint: disable=g-import-not-at-top
  name = config.model.name
  if imported.is_import_path(name):
    imported.check(config)  # Imports it: a typo or a missing module fails here.
    # Silently ignored, these would look like settings of the user's model.
    for key, default in (('model.activation', 'relu'), ('model.dtype', 'float32')):
      if _lookup(config, key) != default:
        _fail(key, _lookup(config, key), f'it applies to the built-in models only; {name} '
              'takes its settings from config.model.kwargs')
    return
  _check_choice(config, 'model.name', MODELS)
  if config.model.kwargs:
    _fail('model.kwargs', config.model.kwargs.to_dict(),
          f"it is for 'package.module:Class' models; built-in {name!r} reads the other "
          'config.model keys')
  _check_choice(config, 'model.activation', activations.NAMES)


def _loss_task(config) -> str:
  from pipeline import losses  # pylint: disable=g-import-not-at-top  # Loads JAX.
  _check_choice(config, 'loss.name', losses.NAMES)
  return losses.TASKS[config.loss.name]


def _check_loss(config) -> None:
  """The loss must fit the targets: classification losses class labels, regression
  losses float targets, sigmoid binary cross-entropy exactly two classes."""
  _check_choice(config, 'data.synthetic_task', ('classification', 'regression'))
  loss, task = config.loss.name, _loss_task(config)
  regression_data = (config.data.name == 'synthetic'
                     and config.data.synthetic_task == 'regression')
  if task == 'regression' and not regression_data:
    _fail('loss.name', loss,
          f'a regression loss needs float targets, but config.data.name='
          f'{config.data.name!r} has class labels (regression targets come only from '
          "data.name='synthetic' with data.synthetic_task='regression'); use "
          'softmax_cross_entropy or sigmoid_binary_cross_entropy')
  if task == 'classification' and regression_data:
    _fail('loss.name', loss,
          "config.data.synthetic_task='regression' gives float targets, not class labels; "
          'use huber, l2, log_cosh or cosine_distance')
  if loss == 'sigmoid_binary_cross_entropy' and config.data.num_classes != 2:
    _fail('loss.name', loss,
          f'one logit scores two classes, but config.data.num_classes='
          f'{config.data.num_classes}; use softmax_cross_entropy')
  if task == 'regression' and config.optimizer.label_smoothing:
    _fail('optimizer.label_smoothing', config.optimizer.label_smoothing,
          f'it smooths class labels, and config.loss.name={loss!r} has none')


def _check_dpsgd(config) -> None:
  """DP-SGD's guarantee needs each example's gradient clipped on its own."""
  if config.optimizer.name != 'dpsgd':
    return
  from pipeline import models  # pylint: disable=g-import-not-at-top  # As above.
  if config.parallelism == 'pmap':
    _fail('parallelism', config.parallelism,
          "optimizer.name='dpsgd' needs jit: under pmap the per-example gradients are "
          'averaged over the devices before they are clipped, so no example is clipped on '
          'its own and there is no privacy guarantee')
  if config.model.name in models.BATCH_NORM_MODELS:
    _fail('model.name', config.model.name,
          f"optimizer.name='dpsgd' needs a model without BatchNorm (not "
          f'{", ".join(models.BATCH_NORM_MODELS)}): its per-example gradients normalize '
          'each example by its own statistics (a batch of one), a different function from '
          'the one evaluated, and batch statistics would mix examples')


def _check_path(config, key: str, *, directory: bool, hint: str = '') -> None:
  path = _lookup(config, key)
  exists = os.path.isdir(path) if directory else os.path.isfile(path)
  if not path or not exists:
    kind = 'directory' if directory else 'file'
    _fail(key, path, f'no such {kind}' + (f'; {hint}' if hint else ''))
