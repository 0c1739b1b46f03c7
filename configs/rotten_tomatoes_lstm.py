"""A bidirectional LSTM with max-pooling over time on Rotten Tomatoes critic snippets.

embedding 64 (dropout 0.5) -> one bidirectional LSTM of 64 per direction -> max over the
real tokens (dropout 0.5) -> head; adamw 2e-3 with weight decay 0.01, batch 128, 4 epochs,
vocabulary 10,000, 48 tokens (99% of training snippets have at most 40). The model is
chosen on the validation split (eval every 40 steps, about half an epoch; text models peak
after 2-4 epochs, then overfit) and that model is scored on the held-out test split
(`eval.final_split`).

Command:  python -m pipeline.main --config=configs/rotten_tomatoes_lstm.py --workdir=/tmp/rt
Hardware: 2-core CPU (shared, loaded).
Measured: see the table in README.md; the test split has 1,280 rows (+-1.2 points of noise
between seeds). This recipe was picked on validation accuracy among the ones tried; it
does not reach 78% test on both seeds.

Variants: `:book` is the book's unidirectional LSTM as this file had it (embedding 128, one
LSTM of 128, last state, adam 1e-3, 5 epochs): 76.09% / 76.02% test (seeds 0/1) in about
57 s. `:smoke` is 30 steps for tests.
"""

from pipeline import config as config_lib


def get_config(variant: str | None = None):
  config = config_lib.base_config()
  config.data.name = 'rotten_tomatoes'
  config.data.path = ''
  config.data.num_classes = 2
  config.data.eval_split = 'validation'
  config.data.vocab_size = 10000
  config.data.max_len = 48
  config.eval.final_split = 'test'
  config.model.name = 'lstm'
  config.model.embed_dim = 64
  config.model.lstm_sizes = (64,)
  config.model.lstm_bidirectional = True
  config.model.lstm_pooling = 'max'
  config.model.lstm_dropout_rate = 0.5
  config.optimizer.name = 'adamw'
  config.optimizer.learning_rate = 2e-3
  config.optimizer.weight_decay = 0.01
  config.optimizer.schedule = 'constant'
  config.optimizer.warmup_steps = 0
  config.train.global_batch_size = 128
  config.train.num_epochs = 4.0
  config.train.log_every_steps = 20
  config.train.eval_every_steps = 40  # About half an epoch.
  config.checkpoint.every_steps = 40
  config.eval.batch_size = 256
  if variant == 'book':
    config.data.vocab_size = 20000
    config.data.max_len = 64
    config.model.embed_dim = 128
    config.model.lstm_sizes = (128,)
    config.model.lstm_bidirectional = False
    config.model.lstm_pooling = 'last'
    config.model.lstm_dropout_rate = 0.0
    config.optimizer.name = 'adam'
    config.optimizer.learning_rate = 1e-3
    config.optimizer.weight_decay = 0.0
    config.train.global_batch_size = 64
    config.train.num_epochs = 5.0
    config.train.log_every_steps = 40
    config.train.eval_every_steps = 80
    config.checkpoint.every_steps = 80
  elif variant == 'smoke':
    config.train.num_epochs = 0.0
    config.train.num_steps = 30
    config.train.log_every_steps = 5
    config.train.eval_every_steps = 30
    config.checkpoint.every_steps = 10
  elif variant:
    raise ValueError(f'Unknown variant {variant!r}; valid: book, smoke.')
  return config
