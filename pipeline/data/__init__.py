"""The input side: grain pipelines that are deterministic and sharded per process.

    data = make_data(config, process_index=jax.process_index(),
                     process_count=jax.process_count(), workdir=workdir)
    batches = data.train_iter(start_step)      # per-process train batches, forever
    for batch in data.eval_batches(): ...      # one exact, padded and masked pass

See `pipeline.data.pipeline` for the order and sharding scheme, `sources` for the
datasets by `config.data.name`, `images` and `text` for the per-example ops.
"""

from pipeline.data.errors import DataError
from pipeline.data.pipeline import BatchPass
from pipeline.data.pipeline import Data
from pipeline.data.pipeline import make_data
from pipeline.data.pipeline import TrainIterator
from pipeline.data.sources import SOURCES
from pipeline.data.text import Vectorizer

__all__ = ['BatchPass', 'Data', 'DataError', 'SOURCES', 'TrainIterator', 'Vectorizer',
           'make_data']
