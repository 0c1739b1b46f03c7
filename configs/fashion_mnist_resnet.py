"""A small CIFAR-style ResNet (3 stages of 16/32/64 channels, one block each) on
Fashion-MNIST.

Command:  python -m pipeline.main --config=configs/fashion_mnist_resnet.py --workdir=/tmp/r
Hardware: 2-core CPU.
Expected: about 92.6% test accuracy after 10 minutes, 93.0% after 15.
"""

from configs import fashion_mnist_cnn


def get_config(variant: str | None = None):
  config = fashion_mnist_cnn.get_config()
  config.model.name = 'resnet_small'
  config.model.width = 16
  config.model.stage_sizes = (1, 1, 1)
  config.train.num_epochs = 15.0
  if variant == 'smoke':
    fashion_mnist_cnn.smoke(config)
  elif variant:
    raise ValueError(f'Unknown variant {variant!r}; valid: smoke.')
  return config
