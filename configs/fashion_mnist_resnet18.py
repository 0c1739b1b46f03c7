"""ResNet-18 (small-input stem, width 64) on Fashion-MNIST.

Command:  python -m pipeline.main --config=configs/fashion_mnist_resnet18.py --workdir=/tmp/r18
Hardware: an accelerator; on the 2-core CPU about 55 images/s (a step of 64 takes ~1.2 s).
Expected: about 94-95% test accuracy after 30 epochs (a few minutes on one GPU).
"""

from configs import fashion_mnist_cnn


def get_config(variant: str | None = None):
  config = fashion_mnist_cnn.get_config()
  config.model.name = 'resnet18'
  config.model.width = 64
  config.model.stem = 'small'
  if variant == 'smoke':
    fashion_mnist_cnn.smoke(config)
    config.model.width = 8  # The real width costs seconds per step on a CPU.
  elif variant:
    raise ValueError(f'Unknown variant {variant!r}; valid: smoke.')
  return config
