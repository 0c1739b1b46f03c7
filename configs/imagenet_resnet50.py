"""ResNet-50 on ImageNet-1k from TFDS (`imagenet2012`, prepared as ArrayRecord, e.g. in GCS).

Command (TPU VM, every worker):
  python -m pipeline.main --config=configs/imagenet_resnet50.py --workdir=gs://BUCKET/r50 \
    --config.data.tfds_data_dir=gs://BUCKET/tensorflow_datasets
Hardware: v4-32 TPU slice (global batch 4096) or 2 nodes x 8 A100 (global batch 2048 with
  --config.train.global_batch_size=2048 --config.optimizer.learning_rate=0.8).
Expected: about 76% top-1 after 90 epochs; roughly 6-7 hours on a v4-32.
Variant `:smoke` runs on synthetic 224x224x3 data, for the tests.
"""

from pipeline import config as config_lib


def get_config(variant: str | None = None):
  config = config_lib.base_config()
  config.data.name = 'tfds'
  config.data.tfds_name = 'imagenet2012'
  config.data.path = ''
  config.data.eval_split = 'validation'
  config.data.num_classes = 1000
  config.data.image_size = 224
  config.data.channels = 3
  config.data.random_flip = True
  config.model.name = 'resnet50'
  config.model.stem = 'imagenet'
  config.model.dtype = 'bfloat16'
  config.optimizer.name = 'sgd'
  config.optimizer.learning_rate = 1.6  # 0.1 per 256 examples.
  config.optimizer.momentum = 0.9
  config.optimizer.nesterov = True
  config.optimizer.weight_decay = 1e-4
  config.optimizer.warmup_steps = 1560  # 5 epochs at batch 4096.
  config.optimizer.label_smoothing = 0.1
  config.train.global_batch_size = 4096
  config.train.num_epochs = 90.0
  config.train.log_every_steps = 100
  config.train.eval_every_steps = 3120
  config.checkpoint.every_steps = 1000
  config.eval.batch_size = 4096
  config.data.num_workers = 16
  if variant == 'smoke':
    config.data.name = 'synthetic'
    config.data.synthetic_shape = (64, 64, 3)
    config.data.image_size = 0
    config.data.num_workers = 0
    config.data.num_classes = 10
    config.model.width = 8
    config.model.dtype = 'float32'
    config.train.num_epochs = 0.0
    config.optimizer.warmup_steps = 1
    config.train.num_steps = 3
    config.train.global_batch_size = 16
    config.eval.batch_size = 64
  elif variant:
    raise ValueError(f'Unknown variant {variant!r}; valid: smoke.')
  return config
