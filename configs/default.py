"""The default job: the book's CNN on Fashion-MNIST (the best model this 2-core CPU trains
to >= 93.5% test accuracy within 10 minutes; small ResNets are slower per point here).

Command:  python -m pipeline.main --config=configs/default.py --workdir=workdir
Hardware: 2-core CPU (one device).
Expected: 93.57% test accuracy on all 10k test images after 16 epochs (measured); `make train` wall
times are in the README's results table.
Variant `:smoke` trains 30 steps for the tests.
"""

from configs import fashion_mnist_cnn


def get_config(variant: str | None = None):
  return fashion_mnist_cnn.get_config(variant)
