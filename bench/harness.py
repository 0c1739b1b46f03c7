"""What every benchmark shares: fake-device set-up, configs by model, timing, fan-out.

`python bench/X.py` puts bench/ first on sys.path, so the scripts `import harness`; this
module puts the repository root there too, for `pipeline` and `configs`.

Call `init_devices(n)` before anything imports jax: XLA reads the fake-device count once,
when the backend starts. Several device counts therefore need several processes;
`fan_out` reruns the calling script once per count and collects each child's result.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

RESULT_PREFIX = 'BENCH_RESULT '
MODELS = ('cnn', 'resnet18', 'lstm')


def init_devices(count: int, platform: str = 'cpu') -> None:
  """Sets the fake CPU device count (and quiet TensorFlow) before jax is imported."""
  if 'jax' in sys.modules:
    raise RuntimeError('init_devices must run before jax is imported')
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  if platform == 'cpu':
    flags.append(f'--xla_force_host_platform_device_count={count}')
    os.environ['JAX_PLATFORMS'] = 'cpu'
  os.environ['XLA_FLAGS'] = ' '.join(flags)
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')


def device_counts(text: str) -> list[int]:
  return [int(n) for n in text.split(',') if n.strip()]


def make_config(model: str, *, width: int = 16):
  """The benchmark's config for `model`: the default CNN, a small ResNet-18, or the LSTM.

  cnn       configs/default.py as is (book CNN, Fashion-MNIST, crop+flip, batch 128).
  resnet18  configs/fashion_mnist_resnet18.py resized to 32x32, `width` channels, batch 128.
  lstm      configs/rotten_tomatoes_lstm.py (batch 64).
  """
  if model == 'cnn':
    from configs import default
    return default.get_config()
  if model == 'resnet18':
    from configs import fashion_mnist_resnet18
    config = fashion_mnist_resnet18.get_config()
    config.data.image_size = 32
    config.model.width = width
    return config
  if model == 'lstm':
    from configs import rotten_tomatoes_lstm
    config = rotten_tomatoes_lstm.get_config()
    config.eval.final_split = ''  # The final test pass is no part of throughput.
    return config
  raise ValueError(f'--model={model!r}: valid models are {", ".join(MODELS)}')


def short_run(config, num_steps: int, log_every: int):
  """`config` trimmed to `num_steps` steps, logging every `log_every`, eval and
  checkpoints pushed past the end (the loop still evaluates and saves once, at the end)."""
  config = config.copy_and_resolve_references()
  config.train.num_epochs = 0.0
  config.train.num_steps = num_steps
  config.train.log_every_steps = log_every
  config.train.eval_every_steps = 10 * num_steps
  config.checkpoint.every_steps = 10 * num_steps
  config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, num_steps // 2)
  return config


def interleaved_real_loop(config, workdir: str, *, window_steps: int, rounds: int,
                          between: Callable[[int, dict], None]) -> list[dict]:
  """Runs the real `train.train_and_evaluate` for `rounds` + 1 log windows of
  `window_steps` steps, calling `between(round, scalars)` after each window but the first.

  The loop itself measures each window (perf/examples_per_sec, perf/data_wait_fraction)
  and restarts its clock after writing them, so what `between` runs (the other variants'
  timed segments) is not counted in the loop's figures; the first window holds the
  compile and is skipped. This interleaves the real loop with the variants it is compared
  with at window granularity, inside one run, on the same shared cores.

  Returns the scalars of windows 2 .. rounds + 1 (as written to metrics.jsonl).
  """
  from clu import metric_writers
  from pipeline import reporting, train

  windows = []

  class Interleave(metric_writers.MultiWriter):
    def write_scalars(self, step, scalars):
      super().write_scalars(step, scalars)
      if 'perf/examples_per_sec' in scalars and step > window_steps:
        windows.append(dict(scalars))
        between(len(windows) - 1, dict(scalars))

  make_writer = reporting.make_writer
  reporting.make_writer = lambda workdir, *, lead: Interleave([make_writer(workdir, lead=lead)])
  try:
    train.train_and_evaluate(short_run(config, (rounds + 1) * window_steps, window_steps),
                             workdir)
  finally:
    reporting.make_writer = make_writer
  return windows


def timed_steps(run_one: Callable[[], Any], seconds: float, *, finish: Callable[[], Any],
                min_steps: int = 3, max_steps: int = 100_000) -> tuple[int, float]:
  """Calls `run_one` until `seconds` have passed (and at least `min_steps` times), then
  `finish` (which waits for the last step), all inside the timed interval.

  `run_one` must itself bound the work in flight (block on an earlier step's output).
  Returns (steps, elapsed seconds).
  """
  start = time.perf_counter()
  steps = 0
  while steps < max_steps:
    run_one()
    steps += 1
    if steps >= min_steps and time.perf_counter() - start >= seconds:
      break
  finish()
  return steps, time.perf_counter() - start


def matmul_peak(size: int = 2048, reps: int = 5, dtype: str = 'float32') -> float:
  """FLOP/s of a size x size jnp.dot on device 0: the median of `reps` timed calls."""
  import jax
  import jax.numpy as jnp
  key = jax.random.PRNGKey(0)
  a = jax.random.normal(key, (size, size), dtype)
  b = jax.random.normal(jax.random.fold_in(key, 1), (size, size), dtype)
  dot = jax.jit(jnp.dot)
  dot(a, b).block_until_ready()
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    dot(a, b).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * size**3 / statistics.median(times)


def compiled_flops(jitted: Callable, *args) -> float:
  """Model FLOPs of one call of `jitted(*args)`, from XLA's cost analysis.

  Counted on one device: the function under `jitted` is compiled again without shardings
  when the arguments span several devices. Under SPMD each device's program repeats the
  replicated work (the optimizer update of every parameter), so the per-device count times
  the device count would overstate the model's FLOPs (4x for the LSTM on 8 devices).
  """
  import jax
  devices = set()
  for leaf in jax.tree.leaves(args):
    if isinstance(leaf, jax.Array):
      devices |= set(leaf.sharding.device_set)
  if len(devices) > 1:
    jitted = jax.jit(jitted.__wrapped__)
    args = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
                        if isinstance(x, jax.Array) else x, args)
  analysis = jitted.lower(*args).compile().cost_analysis()
  if isinstance(analysis, (list, tuple)):  # Older jax returned one dict per module.
    analysis = analysis[0]
  return float(analysis.get('flops', 0.0))


def median(values: Sequence[float]) -> float:
  return statistics.median(values) if values else float('nan')


def emit(result: dict) -> None:
  """Prints the machine-readable result line `fan_out` collects."""
  print(RESULT_PREFIX + json.dumps(result), flush=True)


def fan_out(script: str, argv: Sequence[str], counts: Sequence[int]) -> list[dict]:
  """Runs `script` once per device count (`--devices N` appended), streaming its output.

  Returns each child's result dict (from its `emit` line), in the order of `counts`.
  """
  results = []
  for count in counts:
    print(f'\n=== --devices {count} ===', flush=True)
    command = [sys.executable, script, *argv, '--devices', str(count)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, bufsize=1)
    result = None
    for line in process.stdout:
      if line.startswith(RESULT_PREFIX):
        result = json.loads(line[len(RESULT_PREFIX):])
      else:
        print(line, end='', flush=True)
    if process.wait() != 0 or result is None:
      raise SystemExit(f'{" ".join(command)} failed with exit status {process.returncode}')
    results.append(result)
  return results


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
  """A plain fixed-width text table."""
  cells = [[str(h) for h in header]] + [[_cell(v) for v in row] for row in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
  lines = ['  '.join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
  lines.insert(1, '  '.join('-' * w for w in widths))
  return '\n'.join(lines)


def _cell(value: Any) -> str:
  if isinstance(value, float):
    if value != value:
      return '-'
    if abs(value) >= 100:
      return f'{value:,.0f}'
    return f'{value:.3g}' if abs(value) < 10 else f'{value:.1f}'
  return str(value)
