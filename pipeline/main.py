"""Entry point: python -m pipeline.main --config=configs/X.py[:variant] --workdir=DIR.

`--mode=evaluate|predict --workdir=DIR` needs no --config: it runs with the config saved
in DIR's checkpoints (overrides of eval.* and predict.* apply). Kept short on purpose:
the logic lives in importable, tested modules.
"""

import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from pipeline import config as config_lib
from pipeline import exits
from pipeline import multihost

# The default is the schema itself, so that --config.KEY overrides parse without --config.
_CONFIG = config_flags.DEFINE_config_file(
    'config', os.path.join(os.path.dirname(config_lib.__file__), 'config.py'),
    'Config file, optionally with a variant: configs/x.py:smoke. Required to train; '
    'evaluate and predict default to the config saved in --workdir.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'evaluate', 'predict'], 'What to run.')
flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config_given = flags.FLAGS['config'].present
  if _MODE.value == 'train' and not config_given:
    raise app.UsageError('--config is required to train, e.g. --config=configs/default.py.')
  # Before any other JAX call: joining a cluster is impossible once a backend exists.
  multihost.initialize()
  multihost.check_platform()  # Before anything compiles: a GPU job on CPUs stops here.
  config = _CONFIG.value
  if _MODE.value != 'train':
    from pipeline import evaluate  # pylint: disable=g-import-not-at-top
    config = evaluate.mode_config(_WORKDIR.value, config,
                                  config_flags.get_override_values(flags.FLAGS['config']),
                                  config_given)
  jax.config.update('jax_debug_nans', config.debug_nans)
  jax.config.update('jax_enable_x64', config.enable_x64)
  config_lib.validate(config, num_devices=jax.device_count(),
                      num_processes=jax.process_count())
  logging.info('%s', multihost.topology_line())
  # Imported here so that --help and config errors answer before TensorFlow loads.
  # pylint: disable=g-import-not-at-top
  if _MODE.value == 'train':
    from pipeline import train
    with exits.exit_codes(jax.process_count()):
      train.train_and_evaluate(config, _WORKDIR.value)
  elif _MODE.value == 'evaluate':
    from pipeline import evaluate
    evaluate.evaluate_checkpoint(config, _WORKDIR.value)
  else:
    from pipeline import predict
    predict.predict(config, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
