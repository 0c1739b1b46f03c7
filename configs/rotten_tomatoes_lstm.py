"""A one-layer LSTM on Rotten Tomatoes critic snippets (fresh vs rotten).

The model is chosen on the validation split (text models peak after 2-4 epochs, then
overfit) and that model is scored on the held-out test split (`eval.final_split`).

Command:  python -m pipeline.main --config=configs/rotten_tomatoes_lstm.py --workdir=/tmp/rt
Hardware: 2-core CPU.
Expected: about 77% test accuracy in 1-2 minutes (the test split has ~1,280 rows: +-1.2
points of noise between seeds).
"""

from pipeline import config as config_lib


def get_config(variant: str | None = None):
  config = config_lib.base_config()
  config.data.name = 'rotten_tomatoes'
  config.data.path = ''
  config.data.num_classes = 2
  config.data.eval_split = 'validation'
  config.data.vocab_size = 20000
  config.data.max_len = 64
  config.eval.final_split = 'test'
  config.model.name = 'lstm'
  config.model.embed_dim = 128
  config.model.lstm_sizes = (128,)
  config.optimizer.name = 'adam'
  config.optimizer.learning_rate = 1e-3
  config.optimizer.schedule = 'constant'
  config.optimizer.warmup_steps = 0
  config.train.global_batch_size = 64
  config.train.num_epochs = 5.0
  config.train.log_every_steps = 40
  config.train.eval_every_steps = 80  # About half an epoch.
  config.checkpoint.every_steps = 80
  config.eval.batch_size = 256
  if variant == 'smoke':
    config.train.num_epochs = 0.0
    config.train.num_steps = 30
    config.train.log_every_steps = 5
    config.train.eval_every_steps = 30
    config.checkpoint.every_steps = 10
  elif variant:
    raise ValueError(f'Unknown variant {variant!r}; valid: smoke.')
  return config
