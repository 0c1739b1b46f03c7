"""A small NNX model of your own on Fashion-MNIST: the model is in this file.

`config.model.name = 'configs.fashion_mnist_nnx:CNN'` names the class below by import
path, and `config.model.kwargs` are its constructor's arguments (the pipeline adds
`rngs`). Any importable module works the same way, with a Linen or an NNX class; see
pipeline/models/imported.py. Its BatchNorm statistics and dropout resume exactly, and it
shards like the built-in models (tests/test_imported.py).

Command:  python -m pipeline.main --config=configs/fashion_mnist_nnx.py --workdir=/tmp/nnx
Hardware: 2-core CPU (one device).
Expected: 89.88% test accuracy (all 10k; eval loss 0.273) after 3 epochs (2,813 steps),
91 s start to finish (measured once, 2026-12-02).
Variant `:smoke` trains 30 steps for the tests.
"""

from flax import nnx
import jax

from configs import fashion_mnist_cnn
from pipeline import config as config_lib


class Features(nnx.Module):
  """conv 3x3 -> BatchNorm -> relu -> avg_pool 2 -> dense -> relu."""

  def __init__(self, channels: int, features: int, image_size: int, hidden: int, *,
               rngs: nnx.Rngs):
    # No conv bias: BatchNorm's mean subtraction would cancel it.
    self.conv = nnx.Conv(channels, features, (3, 3), use_bias=False, rngs=rngs)
    self.norm = nnx.BatchNorm(features, momentum=0.9, rngs=rngs)
    self.dense = nnx.Linear((image_size // 2)**2 * features, hidden, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.avg_pool(nnx.relu(self.norm(self.conv(x))), (2, 2), strides=(2, 2))
    return nnx.relu(self.dense(x.reshape(x.shape[0], -1)))


class CNN(nnx.Module):
  """`Features` as 'backbone', dropout, and a linear 'head' (the paths freezing uses)."""

  def __init__(self, num_classes: int, channels: int = 1, image_size: int = 28,
               features: int = 32, hidden: int = 128, dropout_rate: float = 0.3, *,
               rngs: nnx.Rngs):
    self.backbone = Features(channels, features, image_size, hidden, rngs=rngs)
    self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
    self.head = nnx.Linear(hidden, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.head(self.dropout(self.backbone(x)))


def get_config(variant: str | None = None):
  config = config_lib.base_config()
  config.data.name = 'fashion_mnist'
  config.model.name = 'configs.fashion_mnist_nnx:CNN'
  # A reference, so --config.data.num_classes=N resizes the head too.
  config.model.kwargs = {'num_classes': config.data.get_ref('num_classes'),
                         'features': 32, 'hidden': 128, 'dropout_rate': 0.3}
  config.optimizer.name = 'adamw'
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 200
  config.train.global_batch_size = 64
  config.train.num_epochs = 3.0
  config.train.log_every_steps = 200
  config.train.eval_every_steps = 938  # Every epoch.
  config.checkpoint.every_steps = 938
  config.eval.batch_size = 1000
  if variant == 'smoke':
    fashion_mnist_cnn.smoke(config)  # The same 30 steps as the built-in CNN's tests.
  elif variant:
    raise ValueError(f'Unknown variant {variant!r}; valid: smoke.')
  return config
