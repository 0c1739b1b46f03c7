"""ResNet-18 on CIFAR-10 from TFDS (prepared ArrayRecord data; nothing downloads at run time).

Prepare once where the network allows: `tfds build cifar10 --file_format=array_record`.
Command:  python -m pipeline.main --config=configs/cifar10_resnet18.py --workdir=DIR \
            --config.data.tfds_data_dir=~/tensorflow_datasets
Hardware: one GPU or a v4-8 TPU (global batch 512).
Recipe: pad-4 random crop and flip; SGD (Nesterov momentum 0.9) with coupled L2 weight
  decay 5e-4, the CIFAR ResNet recipes' form (kuangliu/pytorch-cifar).
Expected: not measured with this pipeline. kuangliu/pytorch-cifar reports 93.02% test
  accuracy for its ResNet-18 with this augmentation and weight decay (its README).
Variant `:smoke` runs on synthetic 32x32x3 data, for the tests.
"""

from pipeline import config as config_lib


def get_config(variant: str | None = None):
  config = config_lib.base_config()
  config.data.name = 'tfds'
  config.data.tfds_name = 'cifar10'
  config.data.path = ''
  config.data.channels = 3
  config.data.random_crop_pad = 4
  config.data.random_flip = True
  config.model.name = 'resnet18'
  config.model.stem = 'small'
  config.model.dtype = 'bfloat16'
  config.optimizer.name = 'sgd'
  config.optimizer.learning_rate = 0.4
  config.optimizer.momentum = 0.9
  config.optimizer.nesterov = True
  config.optimizer.weight_decay = 5e-4
  config.optimizer.weight_decay_coupled = True
  config.optimizer.warmup_steps = 500
  config.optimizer.label_smoothing = 0.1
  config.train.global_batch_size = 512
  config.train.num_epochs = 200.0
  config.train.log_every_steps = 100
  config.train.eval_every_steps = 1000
  config.checkpoint.every_steps = 1000
  config.eval.batch_size = 1000
  if variant == 'smoke':
    config.data.name = 'synthetic'
    config.data.synthetic_shape = (32, 32, 3)
    config.model.width = 8
    config.model.dtype = 'float32'
    config.train.num_epochs = 0.0
    config.optimizer.warmup_steps = 1
    config.train.num_steps = 5
    config.train.global_batch_size = 64
    config.eval.batch_size = 256
  elif variant:
    raise ValueError(f'Unknown variant {variant!r}; valid: smoke.')
  return config
