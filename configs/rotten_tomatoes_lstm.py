"""The book's LSTM on Rotten Tomatoes critic snippets (fresh vs rotten), and a BiLSTM.

Default: embedding 128 -> one LSTM of 128 -> last state -> head; adam 1e-3, batch 64,
5 epochs, vocabulary 20,000, 64 tokens. Variant `:bilstm`: embedding 64 (dropout 0.5) ->
one bidirectional LSTM of 64 per direction -> max over the real tokens (dropout 0.5) ->
head; adamw 2e-3 with weight decay 0.01, batch 128, 4 epochs, vocabulary 10,000, 48
tokens (99% of training snippets have at most 40).

The model is chosen on the validation split (eval about every half epoch; text models
peak after 2-4 epochs, then overfit) and that model is scored on the held-out test split
(`eval.final_split`).

Command:  python -m pipeline.main --config=configs/rotten_tomatoes_lstm.py --workdir=/tmp/rt
Hardware: 2-core CPU.
Expected (measured test accuracy of the val-selected model, seeds 0 / 1): default 76.09% / 76.02%
in about 57 s; `:bilstm` 76.41% / 75.94% in 165-192 s with other jobs on the cores
(2026-12-02). The test split has ~1,280 rows (+-1.2 points between seeds): the BiLSTM is
no better here, and neither reaches 78%; configs/rotten_tomatoes.py's bag of n-grams does.
Variant `:smoke` is 30 steps for the tests.
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
  if variant == 'bilstm':
    config.data.vocab_size = 10000
    config.data.max_len = 48
    config.model.embed_dim = 64
    config.model.lstm_sizes = (64,)
    config.model.lstm_bidirectional = True
    config.model.lstm_pooling = 'max'
    config.model.lstm_dropout_rate = 0.5
    config.optimizer.name = 'adamw'
    config.optimizer.learning_rate = 2e-3
    config.optimizer.weight_decay = 0.01
    config.train.global_batch_size = 128
    config.train.num_epochs = 4.0
    config.train.log_every_steps = 20
    config.train.eval_every_steps = 40  # About half an epoch.
    config.checkpoint.every_steps = 40
  elif variant == 'smoke':
    config.train.num_epochs = 0.0
    config.train.num_steps = 30
    config.train.log_every_steps = 5
    config.train.eval_every_steps = 30
    config.checkpoint.every_steps = 10
  elif variant:
    raise ValueError(f'Unknown variant {variant!r}; valid: bilstm, smoke.')
  return config
