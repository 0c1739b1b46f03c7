"""An LSTM on IMDB reviews: TFDS `imdb_reviews` (prepared), or the book's Kaggle CSV.

Command (TFDS):  python -m pipeline.main --config=configs/imdb_lstm.py --workdir=DIR
Command (CSV):   python -m pipeline.main --config=configs/imdb_lstm.py:csv --workdir=DIR \
                   --config.data.path=IMDB_Dataset.csv
  (columns `review` and `sentiment` = positive/negative; a seeded split is held out).
Hardware: 2-core CPU or one GPU. Expected: about 85-87% test accuracy after 3 epochs.
Variant `:smoke` runs on the offline Rotten Tomatoes text, for the tests.
"""

from pipeline import config as config_lib


def get_config(variant: str | None = None):
  config = config_lib.base_config()
  config.data.name = 'tfds'
  config.data.tfds_name = 'imdb_reviews'
  config.data.path = ''
  config.data.num_classes = 2
  config.data.vocab_size = 20000
  config.data.max_len = 256
  config.model.name = 'lstm'
  config.model.embed_dim = 128
  config.model.lstm_sizes = (128,)
  config.optimizer.name = 'adam'
  config.optimizer.schedule = 'constant'
  config.optimizer.learning_rate = 1e-3
  config.train.global_batch_size = 64
  config.train.num_epochs = 3.0
  config.train.log_every_steps = 50
  config.train.eval_every_steps = 390
  config.checkpoint.every_steps = 390
  config.eval.batch_size = 500
  if variant == 'csv':
    config.data.name = 'csv_text'
    config.data.text_column = 'review'
    config.data.label_column = 'sentiment'
    config.data.label_names = ('negative', 'positive')
  elif variant == 'smoke':
    # The offline Rotten Tomatoes text stands in for IMDB (both: binary sentiment).
    config.data.name = 'rotten_tomatoes'
    config.data.eval_split = 'validation'
    config.data.max_len = 32
    config.train.num_epochs = 0.0
    config.train.num_steps = 5
    config.eval.batch_size = 256
  elif variant:
    raise ValueError(f'Unknown variant {variant!r}; valid: csv, smoke.')
  return config
