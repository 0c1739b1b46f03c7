"""The book's CNN on Fashion-MNIST, with random-crop/flip augmentation and AdamW.

Command:  python -m pipeline.main --config=configs/fashion_mnist_cnn.py --workdir=/tmp/fmnist
Hardware: 2-core CPU (one device).
Expected: about 93.5% test accuracy after 30 epochs (14,040 steps), 10-12 minutes.
Variant `:smoke` trains 30 steps for the tests.
"""

from pipeline import config as config_lib


def get_config(variant: str | None = None):
  config = config_lib.base_config()
  config.data.name = 'fashion_mnist'
  config.data.random_crop_pad = 2
  config.data.random_flip = True
  config.model.name = 'cnn'
  config.optimizer.name = 'adamw'
  config.optimizer.learning_rate = 1e-3
  config.optimizer.schedule = 'warmup_cosine'
  config.optimizer.warmup_steps = 500
  config.optimizer.weight_decay = 0.05
  config.train.global_batch_size = 128
  config.train.num_epochs = 30.0
  config.train.log_every_steps = 200
  config.train.eval_every_steps = 2340  # Every 5 epochs.
  config.checkpoint.every_steps = 2340
  config.eval.batch_size = 1000
  if variant == 'smoke':
    smoke(config)
  elif variant:
    raise ValueError(f'Unknown variant {variant!r}; valid: smoke.')
  return config


def smoke(config):
  """A few steps on the same data: what the tests run."""
  config.train.num_epochs = 0.0
  config.train.num_steps = 30
  config.train.global_batch_size = 64
  config.optimizer.warmup_steps = 5
  config.train.log_every_steps = 5
  config.train.eval_every_steps = 30
  config.checkpoint.every_steps = 10
  config.eval.batch_size = 1000
