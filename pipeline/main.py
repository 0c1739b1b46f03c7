"""Entry point: python -m pipeline.main --config=configs/X.py[:variant] --workdir=DIR.

Kept short on purpose: the logic lives in importable, tested modules.
"""

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from pipeline import config as config_lib
from pipeline import multihost

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, optionally with a variant: configs/x.py:smoke.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'evaluate', 'predict'], 'What to run.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  # Before any other JAX call: joining a cluster is impossible once a backend exists.
  multihost.initialize()
  jax.config.update('jax_debug_nans', config.debug_nans)
  jax.config.update('jax_enable_x64', config.enable_x64)
  config_lib.validate(config, num_devices=jax.device_count(),
                      num_processes=jax.process_count())
  logging.info('%s', multihost.topology_line())
  # Imported here so that --help and config errors answer before TensorFlow loads.
  # pylint: disable=g-import-not-at-top
  if _MODE.value == 'train':
    from pipeline import train
    train.train_and_evaluate(config, _WORKDIR.value)
  elif _MODE.value == 'evaluate':
    from pipeline import evaluate
    evaluate.evaluate_checkpoint(config, _WORKDIR.value)
  else:
    from pipeline import predict
    predict.predict(config, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
