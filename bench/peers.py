"""Our loop against Keras 3 `fit` (JAX backend) on the same CNN, data, batch and devices.

Throughput (default): one process per device count (`--devices 1,8`) runs, round by
round, one log window of each variant:
  ours K=k   the unmodified `train.train_and_evaluate` of configs/default.py with
             `train.steps_per_call` = k, for every k of `--ks`; its figure is the
             perf/examples_per_sec it writes for the window (the first one, compile, dropped);
  keras s    `model.fit` of the same recipe, `jit_compile=True`, `steps_per_execution` = s
             for every s of `--keras-spe`, timed over `--window-steps` steps after a warm-up
             fit of the same length (so each timed fit also pays what a fit call costs).
Our loops run in threads that take turns with the Keras fits (one runs at a time): each
loop blocks inside its metric writer after a window until its next turn, and the loop
restarts its clock after the write, so waiting is not counted.

Time to accuracy (`--time-to-accuracy`, ~2 x 12 min): `python -m pipeline.main` of
configs/default.py as a subprocess, and this script's Keras recipe as a subprocess, one
after the other; wall clock from each process's start to its first eval >= `--target` on
the full 10k test set, both evaluated every `--eval-every` steps.

The Keras recipe is built from the config at run time: the model's fields are read off the
pipeline's own Flax module, the optimizer and schedule from config.optimizer, the
augmentation becomes preprocessing layers inside the model, and the data are the
pipeline's own normalized arrays. A config key this script does not translate, set away
from its default, stops it with the key's name.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import harness

ROUND_MULTIPLE = 32  # Windows are whole calls of every K and every steps_per_execution.

# Keys that do not change what is trained (where, how often to log, save, evaluate, how
# the input is read); left to the pipeline, ignored for Keras.
_IGNORED = ('data.path', 'data.num_workers', 'data.prefetch_threads',
            'data.device_prefetch', 'train.log_every_steps', 'train.eval_every_steps',
            'train.steps_per_call', 'eval.', 'checkpoint.', 'watchdog.', 'profile.',
            'mesh.', 'fsdp', 'parallelism', 'predict.', 'early_stopping.', 'seed',
            'model.dropout_rate', 'model.kwargs', 'model.width', 'model.stage_sizes', 'model.stem',
            'model.zero_init_residual', 'model.embed_dim', 'model.lstm_', 'data.vocab_size',
            'data.max_len', 'data.remove_stopwords', 'data.synthetic_', 'data.text_column',
            'data.label_column', 'data.tfds_', 'data.inception_', 'data.crop_padding',
            'data.eval_center_crop', 'optimizer.momentum', 'optimizer.nesterov',
            'optimizer.dp_', 'optimizer.noise_eta', 'optimizer.boundaries',
            'optimizer.scales', 'loss.huber_delta')
# Keys translated below (the model's own fields are checked on the Flax module).
_TRANSLATED = ('data.random_crop_pad', 'data.random_flip', 'data.normalize', 'data.mean',
               'data.std', 'model.hidden_size', 'model.activation', 'optimizer.learning_rate',
               'optimizer.schedule', 'optimizer.warmup_steps', 'optimizer.end_lr_fraction',
               'optimizer.weight_decay', 'optimizer.b1', 'optimizer.b2', 'optimizer.eps',
               'optimizer.clip_grad_norm', 'optimizer.label_smoothing',
               'train.global_batch_size', 'train.num_epochs',
               'train.num_steps')
# Keys that must keep these values: the Keras side has no translation for others.
_REQUIRED = {'data.name': 'fashion_mnist', 'model.name': 'cnn', 'model.dtype': 'float32',
             'optimizer.name': 'adamw', 'optimizer.weight_decay_coupled': False,
             'optimizer.grad_accum_steps': 1,
             'loss.name': 'softmax_cross_entropy', 'freeze': (), 'init_from': '',
             'data.classes': (), 'data.channels': 1, 'debug_nans': False,
             'enable_x64': False}
_CNN_FIELDS = {'num_classes', 'hidden_size', 'batch_norm', 'dropout_rate', 'dtype',
               'axis_name', 'frozen_norm', 'activation', 'parent', 'name'}


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--devices', default='1,8',
                      help='fake CPU device counts, one process each (default 1,8)')
  parser.add_argument('--rounds', type=int, default=5, help='timed rounds (default 5)')
  parser.add_argument('--window-steps', type=int, default=320,
                      help=f'steps per timed window, a multiple of {ROUND_MULTIPLE} '
                      '(default 320)')
  parser.add_argument('--ks', default='1,4,8,16,32', help='our train.steps_per_call values')
  parser.add_argument('--keras-spe', default='1,32', help='Keras steps_per_execution values')
  parser.add_argument('--time-to-accuracy', action='store_true',
                      help='run the time-to-accuracy part instead (about 25 minutes)')
  parser.add_argument('--target', type=float, default=0.93, help='test accuracy to reach')
  parser.add_argument('--eval-every', type=int, default=938,
                      help='time to accuracy: eval cadence in steps, both sides (938: ~1 epoch)')
  parser.add_argument('--tta-keras-spe', type=int, default=32,
                      help='time to accuracy: Keras steps_per_execution')
  parser.add_argument('--keras-tta-child', action='store_true', help=argparse.SUPPRESS)
  parser.add_argument('--workdir', default='', help='time to accuracy: our workdir (default: temp)')
  args = parser.parse_args(argv)
  if args.window_steps % ROUND_MULTIPLE:
    parser.error(f'--window-steps={args.window_steps} must be a multiple of {ROUND_MULTIPLE}')
  return args


# --- The Keras recipe, from the config --------------------------------------------------


def _flat(config, prefix=''):
  out = {}
  for key, value in config.items():
    if hasattr(value, 'items'):
      out.update(_flat(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def check_translatable(config) -> None:
  """Raises SystemExit naming every key whose value the Keras recipe cannot follow."""
  from pipeline import config as config_lib
  from pipeline import models
  defaults = _flat(config_lib.base_config())
  problems = []
  for key, value in _flat(config).items():
    if key in _REQUIRED:
      if _same(value, _REQUIRED[key]):
        continue
      problems.append(f'{key}={value!r} (the Keras side handles only {_REQUIRED[key]!r})')
    elif key in _TRANSLATED or any(key.startswith(p) for p in _IGNORED):
      continue
    elif key not in defaults or not _same(value, defaults[key]):
      problems.append(f'{key}={value!r} (not translated to Keras)')
  o = config.optimizer
  if o.schedule not in ('constant', 'warmup_cosine'):
    problems.append(f'optimizer.schedule={o.schedule!r} (translated: constant, warmup_cosine)')
  if config.data.image_size not in (0, 28):
    problems.append(f'data.image_size={config.data.image_size} (translated: 0 or 28)')
  module = models.make_model(config)
  fields = set(getattr(module, '__dataclass_fields__', {}))
  if fields - _CNN_FIELDS:
    problems.append(f'the cnn model has fields {sorted(fields - _CNN_FIELDS)} this script '
                    'does not translate')
  if module.batch_norm or module.dropout_rate:
    problems.append(f'cnn with batch_norm={module.batch_norm}, dropout_rate='
                    f'{module.dropout_rate} (translated: neither)')
  if problems:
    raise SystemExit('bench/peers.py cannot build the same recipe in Keras:\n  '
                     + '\n  '.join(problems))


def _same(a, b) -> bool:
  return tuple(a) == tuple(b) if isinstance(a, (tuple, list)) else a == b


def recipe_arrays(config):
  """(x_train, y_train, x_test, y_test, fill): the pipeline's own normalized arrays, in
  split order, and the normalized value of a zero pixel (the crop's padding)."""
  import numpy as np
  from pipeline.data import pipeline as data_lib

  data = data_lib.make_data(config, process_index=0, process_count=1)

  def whole(split):
    xs, ys = [], []
    for batch in data.split_batches(split):
      mask = np.asarray(batch['mask'])
      xs.append(np.asarray(batch['input'])[mask])
      ys.append(np.asarray(batch['label'])[mask])
    return np.concatenate(xs), np.concatenate(ys)

  x_train, y_train = whole(data.train_split)
  x_test, y_test = whole(data.eval_split)
  # Our crop pads the uint8 image with zeros before normalizing: the padding reads as the
  # normalized value of a 0 pixel. `preprocess` runs the eval ops on raw pixels.
  zero = np.zeros((1, *data.input_shape), np.uint8)
  fill = float(data.preprocess([zero[0]]).reshape(-1)[0])
  return x_train, y_train, x_test, y_test, fill


def keras_model(config, fill: float, input_shape, devices: int):
  """The book's CNN in Keras, with the config's augmentation as layers and Flax's init."""
  import keras
  if devices > 1:
    import jax
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()))
  init = 'lecun_normal'  # Flax's default kernel init (truncated normal, fan-in), zero biases.
  act = config.model.activation
  layers = [keras.Input(input_shape)]
  pad = config.data.random_crop_pad
  if pad:
    # Our crop: a random integer offset in [-pad, pad] per axis, zero-padded edges.
    size = input_shape[0]
    translate = keras.layers.RandomTranslation(
        pad / size, pad / size, fill_mode='constant', fill_value=fill,
        interpolation='nearest', seed=config.seed)
    # Keras 3.15 marks this layer as not XLA-compilable for every backend, and `compile`
    # then silently drops jit_compile for the whole model (one warning). Its JAX ops (an affine map_coordinates) trace under jit: the compile checks.
    translate.supports_jit = True
    layers.append(translate)
  if config.data.random_flip:
    layers.append(keras.layers.RandomFlip('horizontal', seed=config.seed + 1))
  for features in (32, 64):
    layers += [keras.layers.Conv2D(features, 3, padding='same', activation=act,
                                   kernel_initializer=init),
               keras.layers.AveragePooling2D(2)]
  layers += [keras.layers.Flatten(),
             keras.layers.Dense(config.model.hidden_size, activation=act,
                                kernel_initializer=init),
             keras.layers.Dense(config.data.num_classes, kernel_initializer=init)]
  keras.utils.set_random_seed(config.seed)
  return keras.Sequential(layers)


def keras_optimizer(config, num_steps: int):
  """AdamW with the config's schedule; decay on kernels only, as optim.decay_mask."""
  import keras
  o = config.optimizer
  if o.schedule == 'warmup_cosine':
    # optax counts the cosine's decay_steps from step 0, Keras from the end of the warmup.
    lr = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0, decay_steps=num_steps - o.warmup_steps,
        alpha=o.end_lr_fraction, warmup_target=o.learning_rate, warmup_steps=o.warmup_steps)
  else:
    lr = o.learning_rate
  optimizer = keras.optimizers.AdamW(
      learning_rate=lr, weight_decay=o.weight_decay, beta_1=o.b1, beta_2=o.b2,
      epsilon=o.eps, global_clipnorm=o.clip_grad_norm or None)
  optimizer.exclude_from_weight_decay(var_names=['bias'])
  return optimizer


def keras_loss(config):
  """Softmax cross-entropy on integer labels, smoothed as optax smooths (1 - a) one-hot
  + a / classes; Keras' sparse loss has no smoothing, so labels are one-hot here."""
  import keras
  smoothing, classes = config.optimizer.label_smoothing, config.data.num_classes
  if not smoothing:
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)

  def loss(labels, logits):
    labels = keras.ops.one_hot(keras.ops.cast(keras.ops.reshape(labels, (-1,)), 'int32'),
                               classes)
    return keras.losses.categorical_crossentropy(labels, logits, from_logits=True,
                                                 label_smoothing=smoothing)
  return loss


def build_keras(config, fill, input_shape, devices, num_steps, spe):
  import keras
  model = keras_model(config, fill, input_shape, devices)
  model.compile(optimizer=keras_optimizer(config, num_steps),
                loss=keras_loss(config),
                metrics=['accuracy'], jit_compile=True, steps_per_execution=spe)
  return model


def our_param_count(config) -> int:
  import jax
  import numpy as np
  from pipeline import models
  module = models.make_model(config)
  variables = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0),
                                                 np.zeros((1, 28, 28, 1), np.float32),
                                                 train=False))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables['params']))


def init_keras_backend():
  os.environ['KERAS_BACKEND'] = 'jax'


# --- Throughput -----------------------------------------------------------------------


class _Turns:
  """One player's baton: `play()` (main thread) lets it run one window and waits for it."""

  def __init__(self):
    self.go, self.done, self.error = threading.Event(), threading.Event(), None

  def play(self):
    self.go.set()
    self.done.wait()
    self.done.clear()
    if self.error is not None:
      raise self.error

  def yield_turn(self):  # Player side: report the window, wait for the next turn.
    self.done.set()
    self.go.wait()
    self.go.clear()


class _NoSignals:
  """`signal` for preemption.StopRequest in our loop's threads: handlers can only be set
  from the main thread, and nothing here stops the loops by signal."""

  def __getattr__(self, name):
    return getattr(signal, name)

  @staticmethod
  def signal(signum, handler):
    del handler
    return signal.getsignal(signum)


class OurLoop:
  """`train.train_and_evaluate` with steps_per_call = k in a thread, one window a turn."""

  def __init__(self, config, k: int, workdir: str, window_steps: int, windows: int):
    self.k, self.turns, self.rates, self.data_wait = k, _Turns(), [], []
    config = config.copy_and_resolve_references()
    config.train.steps_per_call = k
    self.config = harness.short_run(config, windows * window_steps, window_steps)
    self.window_steps, self.workdir = window_steps, workdir
    self.thread = threading.Thread(target=self._run, name=f'ours-k{k}', daemon=True)

  def play(self):
    if not self.thread.is_alive() and not self.rates:
      self.thread.start()
    self.turns.play()

  def finish(self):
    self.turns.go.set()
    self.thread.join()
    if self.turns.error is not None:
      raise self.turns.error

  def write_hook(self, step, scalars):
    if 'perf/examples_per_sec' in scalars and step % self.window_steps == 0:
      self.rates.append(float(scalars['perf/examples_per_sec']))
      self.data_wait.append(float(scalars.get('perf/data_wait_fraction', float('nan'))))
      self.turns.yield_turn()

  def _run(self):
    self.turns.go.wait()
    self.turns.go.clear()
    try:
      from pipeline import train
      train.train_and_evaluate(self.config, self.workdir)
    except BaseException as e:  # pylint: disable=broad-except
      self.turns.error = e
    self.turns.done.set()


def keras_sync_callback():
  """A callback with its own `on_train_batch_end` (as fit's progress bar, verbose=1, has):
  Keras then converts each call's logs to NumPy on the calling thread. Without one, Keras
  hands that conversion to a pool of threads, and on 8 fake CPU devices those threads'
  reads of the replicated logs, racing the next step's launch, leave one device's launch
  stuck: XLA aborts its all-reduce ("only 7 of 8 arrived", 40 s), with or without async
  dispatch (jax 0.10.2, Keras 3.15.1, reproduced with a bare Keras CNN)."""
  import keras

  class SyncLogs(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
      del batch, logs  # Overriding is what matters: Keras checks `utils.is_default`.

  return SyncLogs()


class KerasFit:
  """`model.fit` of `window_steps` steps per turn, timed (the first turn compiles)."""

  def __init__(self, model, x, y, batch: int, spe: int, window_steps: int, devices: int):
    self.model, self.x, self.y, self.batch, self.spe = model, x, y, batch, spe
    self.window_steps, self.rates = window_steps, []
    # One device keeps Keras' fastest setting (logs converted off the main thread);
    # several need the synchronous one (see keras_sync_callback).
    self.callbacks = [keras_sync_callback()] if devices > 1 else []

  def play(self):
    start = time.perf_counter()
    self.model.fit(self.x, self.y, batch_size=self.batch, epochs=1,
                   steps_per_epoch=self.window_steps, shuffle=True, verbose=0,
                   callbacks=self.callbacks)
    # fit ends by writing the state back to the model's variables: waiting on one waits
    # for the last step.
    import jax
    jax.block_until_ready([v.value for v in self.model.trainable_variables])
    self.rates.append(self.window_steps * self.batch / (time.perf_counter() - start))


def throughput_child(args) -> None:
  """One device count: every variant one window a round; emits the medians and ratios."""
  harness.init_devices(args.devices_one)
  init_keras_backend()
  import jax
  from pipeline import preemption
  preemption.signal = _NoSignals()
  from pipeline import reporting
  config = harness.make_config('cnn')
  check_translatable(config)
  batch = config.train.global_batch_size
  ks = harness.device_counts(args.ks)
  for k in ks:
    if ROUND_MULTIPLE % k:
      raise SystemExit(f'--ks: {k} does not divide {ROUND_MULTIPLE}')
  x, y, _, _, fill = recipe_arrays(config)
  ours_params = our_param_count(config)

  tmp = tempfile.mkdtemp(prefix='peers_')
  window_steps = args.window_steps
  windows = args.rounds + 1
  loops = [OurLoop(config, k, os.path.join(tmp, f'k{k}'), window_steps, windows) for k in ks]
  by_thread = {loop.thread.name: loop for loop in loops}

  make_writer = reporting.make_writer

  def hooked_writer(workdir, *, lead):
    from clu import metric_writers
    loop = by_thread[threading.current_thread().name]

    class Hooked(metric_writers.MultiWriter):
      def write_scalars(self, step, scalars):
        super().write_scalars(step, scalars)
        loop.write_hook(step, scalars)

    return Hooked([make_writer(workdir, lead=lead)])

  reporting.make_writer = hooked_writer
  fits = []
  for spe in harness.device_counts(args.keras_spe):
    # The same trimmed schedule as our loops run (harness.short_run).
    model = build_keras(loops[0].config, fill, x.shape[1:], args.devices_one,
                        windows * window_steps, spe)
    fits.append(KerasFit(model, x, y, batch, spe, window_steps, args.devices_one))
  keras_params = fits[0].model.count_params()
  print(f'devices {jax.device_count()}, batch {batch}, window {window_steps} steps, '
        f'{args.rounds} rounds; parameters: ours {ours_params:,}, Keras {keras_params:,}',
        flush=True)
  if ours_params != keras_params:
    raise SystemExit('the Keras model does not have our parameter count')
  players = [*fits, *loops]
  names = [f'keras spe={f.spe}' for f in fits] + [f'ours K={loop.k}' for loop in loops]
  try:
    for r in range(windows):
      for name, player in zip(names, players):
        if not r:
          print(f'warm-up (compile): {name}', flush=True)
        player.play()
        if r:
          print(f'round {r}: {name:14s} {player.rates[-1]:8,.0f} examples/s', flush=True)
  finally:
    for loop in loops:
      loop.finish()
    reporting.make_writer = make_writer
  rates = {name: player.rates[1:] for name, player in zip(names, players)}
  data_wait = {f'ours K={loop.k}': harness.median(loop.data_wait[1:]) for loop in loops}
  harness.emit({'devices': jax.device_count(), 'rates': rates, 'data_wait': data_wait,
                'configured_k': config.train.steps_per_call,
                'window_steps': window_steps, 'params': [ours_params, keras_params]})


def report_throughput(results) -> None:
  rows, lines = [], []
  for result in results:
    rates = result['rates']
    keras = {n: v for n, v in rates.items() if n.startswith('keras')}
    ours = {n: v for n, v in rates.items() if n.startswith('ours')}
    best_keras = max(keras, key=lambda n: harness.median(keras[n]))
    base = ours['ours K=1']
    for name, values in rates.items():
      vs_keras = [a / b for a, b in zip(values, keras[best_keras])]
      vs_k1 = [a / b for a, b in zip(values, base)]
      rows.append((result['devices'], name, harness.median(values), min(values), max(values),
                   harness.median(vs_keras), harness.median(vs_k1),
                   result['data_wait'].get(name, float('nan'))))
    vs_best = {n: harness.median([a / b for a, b in zip(v, keras[best_keras])])
               for n, v in ours.items()}
    best_ours = max(ours, key=lambda n: harness.median(ours[n]))
    lines.append(f'{result["devices"]} device(s): best of ours {best_ours}, best of Keras '
                 f'{best_keras}: {vs_best[best_ours]:.2f}x [target >= 1.10]')
    chosen = f'ours K={result["configured_k"]}'  # The default config's train.steps_per_call.
    if chosen in ours and chosen != best_ours:
      lines.append(f'{result["devices"]} device(s): the config\'s {chosen}, best of Keras '
                   f'{best_keras}: {vs_best[chosen]:.2f}x')
  print('\nexamples/s: median (min-max) over rounds; ratios paired per round, median')
  print(harness.table(rows, ('devices', 'variant', 'median', 'min', 'max', '/keras best',
                             '/ours K=1', 'data wait')))
  print('\n'.join(lines))


# --- Time to accuracy -----------------------------------------------------------------


def time_to_accuracy(args) -> None:
  """Our default job, then the Keras recipe, each a subprocess, one after the other."""
  from configs import default
  config = default.get_config()
  workdir = args.workdir or tempfile.mkdtemp(prefix='peers_tta_')
  command = [sys.executable, '-m', 'pipeline.main', '--config=configs/default.py',
             f'--workdir={workdir}', f'--config.train.eval_every_steps={args.eval_every}']
  print(' '.join(command), flush=True)
  start = time.time()
  process = subprocess.Popen(command, cwd=harness.ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  path = os.path.join(workdir, 'metrics.jsonl')
  ours = None
  while ours is None and process.poll() is None:
    time.sleep(0.5)
    for record in _records(path):
      accuracy = record.get('eval/accuracy')
      if accuracy is not None and accuracy >= args.target:
        ours = (time.time() - start, record['step'], accuracy)
        break
  if process.poll() is None:
    process.send_signal(signal.SIGTERM)  # Ours saves and exits; its time is taken already.
  process.wait()
  print(f'ours: {_crossing(ours, args.target)}', flush=True)

  command = [sys.executable, os.path.abspath(__file__), '--keras-tta-child',
             '--devices', '1', f'--target={args.target}', f'--eval-every={args.eval_every}',
             f'--tta-keras-spe={args.tta_keras_spe}']
  print(' '.join(command), flush=True)
  start = time.time()
  process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
  keras = None
  for line in process.stdout:
    if line.startswith(harness.RESULT_PREFIX):
      result = json.loads(line[len(harness.RESULT_PREFIX):])
      if result['step'] is not None:
        keras = (result['time'] - start, result['step'], result['accuracy'])
    else:
      print(line, end='', flush=True)
  process.wait()
  print(f'keras spe={args.tta_keras_spe}: {_crossing(keras, args.target)}')
  if ours and keras:
    print(f'time to {args.target:.0%}: ours / Keras = {ours[0]:.0f} s / {keras[0]:.0f} s = '
          f'{ours[0] / keras[0]:.2f} (eval every {args.eval_every} steps on both sides)')
  del config


def _records(path):
  try:
    with open(path) as f:
      lines = f.readlines()
  except FileNotFoundError:
    return []
  out = []
  for line in lines:
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError:
      pass  # A line being written.
  return out


def _crossing(found, target) -> str:
  if found is None:
    return f'never reached {target:.0%}'
  seconds, step, accuracy = found
  return (f'{accuracy:.4f} test accuracy at step {step}, {seconds:.0f} s wall from process '
          f'start ({seconds / 60:.1f} min)')


def keras_tta_child(args) -> None:
  """The Keras recipe until its first test eval >= target; emits the crossing."""
  harness.init_devices(1)
  init_keras_backend()
  import keras
  from configs import default
  from pipeline import train
  config = default.get_config()
  check_translatable(config)
  x, y, x_test, y_test, fill = recipe_arrays(config)
  num_steps = train.num_train_steps(config, len(x))
  model = build_keras(config, fill, x.shape[1:], 1, num_steps, args.tta_keras_spe)
  found = {}

  class Target(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
      accuracy = logs.get('val_accuracy', 0.0)
      step = (epoch + 1) * args.eval_every
      print(f'keras: step {step}, test accuracy {accuracy:.4f}', flush=True)
      if accuracy >= args.target and not found:
        found.update(time=time.time(), step=step, accuracy=accuracy)
        self.model.stop_training = True

  # An "epoch" is one eval interval: Keras validates at epoch ends, on the 10k test split.
  model.fit(x, y, batch_size=config.train.global_batch_size,
            epochs=math.ceil(num_steps / args.eval_every), steps_per_epoch=args.eval_every,
            validation_data=(x_test, y_test), validation_batch_size=config.eval.batch_size,
            shuffle=True, verbose=0, callbacks=[Target()])
  harness.emit({'time': found.get('time'), 'step': found.get('step'),
                'accuracy': found.get('accuracy')})


def main(argv):
  args = parse_args(argv)
  if args.keras_tta_child:
    keras_tta_child(args)
    return
  if args.time_to_accuracy:
    time_to_accuracy(args)
    return
  counts = harness.device_counts(args.devices)
  if len(counts) == 1 and os.environ.get('PEERS_CHILD'):
    args.devices_one = counts[0]
    throughput_child(args)
    return
  os.environ['PEERS_CHILD'] = '1'
  child_argv = [a for a in argv]
  for i, a in enumerate(child_argv):  # The children get one count each (fan_out appends).
    if a.startswith('--devices'):
      del child_argv[i:i + (1 if '=' in a else 2)]
      break
  report_throughput(harness.fan_out(os.path.abspath(__file__), child_argv, counts))


if __name__ == '__main__':
  main(sys.argv[1:])
