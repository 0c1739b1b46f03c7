"""ResNet-50 bf16 train step on one GPU: images/s and MFU, without the input pipeline.

Needs only jax, flax, optax, clu and ml_collections (no TensorFlow, no grain), so it runs
on an accelerator image where the full loop's dependencies are missing. The step is the
pipeline's own (`steps.train_step` with `models` and `optim` from configs/imagenet_resnet50.py);
the batch lives on the device. MFU = model FLOPs/s (XLA cost analysis of the compiled step)
over the bf16 peak measured in the same run with a large matmul, and over the datasheet peak.

  python bench/gpu_step.py [--batch 256] [--steps 50]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp

from configs import imagenet_resnet50
from pipeline import losses
from pipeline import models
from pipeline import optim
from pipeline import steps

# Dense bf16 tensor-core peaks from the datasheets, by device-kind substring.
DATASHEET_BF16_TFLOPS = {'H100': 989.0, 'H200': 989.0, 'A100': 312.0, 'L4': 121.0}


def matmul_peak(n: int = 8192, dtype=jnp.bfloat16, reps: int = 10) -> float:
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  start = time.perf_counter()
  for _ in range(reps):
    out = f(a)
  out.block_until_ready()
  return 2 * n**3 * reps / (time.perf_counter() - start)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=256)
  parser.add_argument('--steps', type=int, default=50)
  args = parser.parse_args()

  config = imagenet_resnet50.get_config()
  config.train.global_batch_size = args.batch
  model = models.make_model(config)
  tx, lr_fn = optim.make_optimizer(config, 10_000)
  init = jax.jit(functools.partial(steps.init_state, model, tx, (224, 224, 3), jnp.float32, 0))
  state = init()
  rng = jax.random.PRNGKey(1)
  batch = {'input': jax.random.normal(rng, (args.batch, 224, 224, 3), jnp.float32),
           'label': jax.random.randint(rng, (args.batch,), 0, 1000, jnp.int32)}
  step = jax.jit(functools.partial(steps.train_step, loss=losses.from_config(config),
                                   learning_rate_fn=lr_fn),
                 donate_argnums=0)
  start = time.perf_counter()
  lowered = step.lower(state, batch)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  # The lowered (pre-optimization) module: on GPU the compiled one hides convolutions in
  # cuDNN custom calls that its cost analysis does not count.
  cost = lowered.cost_analysis()
  if not cost:  # GPU backends answer None: count the same step on the CPU backend.
    cpu = jax.sharding.SingleDeviceSharding(jax.devices('cpu')[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cpu),
                            (state, batch))
    cost = step.lower(*abstract).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get('flops', 0.0))
  for _ in range(3):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(args.steps):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  step_s = (time.perf_counter() - start) / args.steps
  peak = matmul_peak()
  device = jax.devices()[0]
  sheet = next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in device.device_kind), None)
  print(f'device {device.device_kind} ({device.platform}), jax {jax.__version__}')
  print(f'ResNet-50 bf16, batch {args.batch}: compile {compile_s:.1f} s, step {step_s*1e3:.1f} '
        f'ms, {args.batch / step_s:,.0f} images/s, {flops / 1e9:.1f} GFLOP/step, '
        f'{flops / step_s / 1e12:.1f} TFLOP/s')
  print(f'measured bf16 matmul peak {peak / 1e12:.0f} TFLOP/s; MFU vs measured '
        f'{flops / step_s / peak:.3f}' + (f', vs datasheet {sheet:.0f} TFLOP/s: '
                                          f'{flops / step_s / (sheet * 1e12):.3f}'
                                          if sheet else ''))
  print(f'final loss {float(metrics.compute()["loss"]):.3f}')


if __name__ == '__main__':
  main()
