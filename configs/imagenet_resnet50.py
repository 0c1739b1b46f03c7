"""ResNet-50 on ImageNet-1k: the standard recipe, from TFDS or a folder of JPEGs.

Command (TPU VM, every worker):
  python -m pipeline.main --config=configs/imagenet_resnet50.py --workdir=gs://BUCKET/r50 \
    --config.data.tfds_data_dir=gs://BUCKET/tensorflow_datasets
From a folder of class subfolders instead (e.g. ILSVRC train/ and val/ sorted by class):
    --config.data.name=image_folder --config.data.path=DIR/train --config.data.eval_path=DIR/val
Hardware: v4-32 TPU slice (global batch 4096) or 2 nodes x 8 A100 (global batch 2048 with
  --config.train.global_batch_size=2048 --config.optimizer.learning_rate=0.8).
Recipe: Inception crop (area 0.08-1, aspect 3/4-4/3, 10 attempts, center-crop fallback) and
  flip; eval on the central 224/256 of the image resized to 224; ImageNet mean/std; each
  block's last BatchNorm scale zero-initialised and SGD (Nesterov momentum 0.9) with
  coupled L2 weight decay 1e-4 on the kernels, lr 0.1 per 256 examples with 5 warm-up
  epochs: Goyal et al. 2017 ("Accurate, Large Minibatch SGD", 76.3% top-1 at batch 8k,
  90 epochs); cosine decay and label smoothing 0.1 as in the Flax ImageNet example.
Expected: not measured with this pipeline (no ImageNet or accelerator slice here). The Flax
  linen ImageNet example (these crops, with bicubic resize) reports 76.72% top-1 after 100 epochs
  at batch 512 on 8 V100 in 13.7 h (its README). Input speed: see bench/input.py --imagenet.
Variant `:smoke` trains 3 steps of a width-4 ResNet-50 on 32x32 crops of a generated JPEG
  folder through the same image_folder path (write it first:
  python bench/jpegs.py /tmp/imagenet_smoke_jpegs 64 --classes 4 --size 96x72).
"""

import os
import tempfile

from pipeline import config as config_lib

SMOKE_JPEGS = os.path.join(tempfile.gettempdir(), 'imagenet_smoke_jpegs')
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # Per channel, [0, 1] scale (torchvision's values).
IMAGENET_STD = (0.229, 0.224, 0.225)


def get_config(variant: str | None = None):
  config = config_lib.base_config()
  config.data.name = 'tfds'
  config.data.tfds_name = 'imagenet2012'
  config.data.path = ''
  config.data.eval_split = 'validation'
  config.data.num_classes = 1000
  config.data.image_size = 224
  config.data.channels = 3
  config.data.inception_crop = True
  config.data.random_flip = True
  config.data.eval_center_crop = True
  config.data.crop_padding = 32
  # JPEG decode and resize release the GIL: on the 2-core machine 4 read threads beat
  # tf.data in every paired run (1.12-1.86x), 2 threads in 2 of 3 (bench/input.py).
  config.data.prefetch_threads = 4
  config.data.mean = IMAGENET_MEAN
  config.data.std = IMAGENET_STD
  config.model.name = 'resnet50'
  config.model.stem = 'imagenet'
  config.model.dtype = 'bfloat16'
  config.model.zero_init_residual = True
  config.optimizer.name = 'sgd'
  config.optimizer.learning_rate = 1.6  # 0.1 per 256 examples.
  config.optimizer.momentum = 0.9
  config.optimizer.nesterov = True
  config.optimizer.weight_decay = 1e-4
  config.optimizer.weight_decay_coupled = True
  config.optimizer.warmup_steps = 1560  # 5 epochs at batch 4096.
  config.optimizer.label_smoothing = 0.1
  config.train.global_batch_size = 4096
  config.train.num_epochs = 90.0
  config.train.log_every_steps = 100
  config.train.eval_every_steps = 3120
  config.checkpoint.every_steps = 1000
  config.eval.batch_size = 4096
  if variant == 'smoke':
    config.data.name = 'image_folder'
    config.data.path = SMOKE_JPEGS
    config.data.validation_fraction = 0.25
    config.data.image_size = 32
    config.data.num_workers = 0
    config.data.num_classes = 4
    config.model.width = 4
    config.model.dtype = 'float32'
    config.train.num_epochs = 0.0
    config.optimizer.warmup_steps = 1
    config.train.num_steps = 3
    config.train.global_batch_size = 16
    config.eval.batch_size = 16
  elif variant:
    raise ValueError(f'Unknown variant {variant!r}; valid: smoke.')
  return config
