"""The book's CNN on Fashion-MNIST, with random-crop/flip augmentation and AdamW.

Command:  python -m pipeline.main --config=configs/fashion_mnist_cnn.py --workdir=/tmp/fmnist
Hardware: 2-core CPU (one device).
Expected: about 93.4% test accuracy after 28 epochs (26,250 steps), about 12 minutes.
Batch 64: on this CPU a step of 64 takes a third of a step of 128 (cache-sized
activations), so it trains faster per example as well as per epoch.
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
  config.train.global_batch_size = 64
  config.train.num_epochs = 28.0
  config.train.log_every_steps = 500
  config.train.eval_every_steps = 4690  # Every 5 epochs.
  config.checkpoint.every_steps = 4690
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
