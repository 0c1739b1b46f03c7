"""Text to token ids: standardize, split, map through a vocabulary fitted on the train split.

Behaves like Keras `TextVectorization(standardize='lower_and_strip_punctuation',
output_mode='int', output_sequence_length=max_len)` as the book uses it, plus the book's
`<br />` stripping for IMDB: ids 0 = padding, 1 = out of vocabulary, then tokens by falling
frequency. The vocabulary is saved as JSON so evaluate and predict map text exactly as
training did.
"""

from __future__ import annotations

import collections
import json
import re
import string
from typing import Iterable, Sequence

import numpy as np

from pipeline import storage
from pipeline.data.errors import DataError

PAD_ID = 0
OOV_ID = 1
FORMAT = 'pipeline.data.text.Vectorizer/1'  # Bumped if the JSON layout ever changes.

# No installed package ships a plain English stop-word list (sklearn and nltk are absent
# and tensorflow/keras carry none), so this short list is our own. It is written after
# punctuation stripping ("dont", not "don't") because that is the form tokens have when
# they are compared. Negations (no, not, nor, never, dont, isnt, ...) are deliberately
# kept out: they carry the sentiment these models learn.
STOP_WORDS = frozenset('''
a about above after again against all am an and any are as at be because been before being
below between both but by can could did do does doing down during each few for from further
had has have having he hed hell hes her here heres hers herself him himself his how hows i
id ill im ive if in into is it its itself lets me more most my myself of off on once only or
other ought our ours ourselves out over own same she shed shell shes should so some such
than that thats the their theirs them themselves then there theres these they theyd theyll
theyre theyve this those through to too under until up very was we wed well were weve what
whats when whens where wheres which while who whos whom why whys with would you youd youll
youre youve your yours yourself yourselves
'''.split())

_TAG = re.compile(r'<[^>]*>')  # HTML tags such as IMDB's "<br />" line breaks.
# Deleting (not spacing) punctuation matches Keras, so "don't" -> "dont", "film." -> "film".
_DROP_PUNCTUATION = str.maketrans('', '', string.punctuation)


def standardize(text: str) -> str:
  """Lower-cases, replaces HTML tags by a space and deletes ASCII punctuation."""
  return _TAG.sub(' ', text.lower()).translate(_DROP_PUNCTUATION)


class Vectorizer:
  """Maps strings to fixed-length int32 token ids with a fitted vocabulary.

  Attributes:
    tokens: the vocabulary; token `tokens[i]` has id `i + 2` (0 = pad, 1 = OOV).
    vocab_size: configured size including pad and OOV (the fitted list may be shorter).
    max_len: every output row has this many ids: post-padded with 0, truncated at the end.
    remove_stopwords: whether `STOP_WORDS` are dropped before lookup.
  """

  def __init__(self, tokens: Sequence[str], *, vocab_size: int, max_len: int,
               remove_stopwords: bool):
    if len(tokens) + 2 > vocab_size:
      raise ValueError(f'{len(tokens)} tokens do not fit vocab_size={vocab_size} '
                       '(two ids are reserved for pad and OOV)')
    self.tokens = tuple(tokens)
    self.vocab_size = vocab_size
    self.max_len = max_len
    self.remove_stopwords = remove_stopwords
    self._ids = {token: i + 2 for i, token in enumerate(self.tokens)}

  @classmethod
  def fit(cls, texts: Iterable[str], *, vocab_size: int, max_len: int,
          remove_stopwords: bool = False) -> Vectorizer:
    """Builds the vocabulary from the most frequent tokens of `texts` (the train split)."""
    counts = collections.Counter()
    for text in texts:
      counts.update(_split(text, remove_stopwords))
    # Ties are broken alphabetically so the vocabulary never depends on text order.
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    tokens = [token for token, _ in ranked[:vocab_size - 2]]
    return cls(tokens, vocab_size=vocab_size, max_len=max_len,
               remove_stopwords=remove_stopwords)

  def __repr__(self) -> str:
    return (f'Vectorizer({len(self.tokens) + 2} ids of vocab_size={self.vocab_size}, '
            f'max_len={self.max_len}, remove_stopwords={self.remove_stopwords})')

  def tokenize(self, text: str) -> list[str]:
    """The tokens of one text after standardization (and stop-word removal if on)."""
    return _split(text, self.remove_stopwords)

  def __call__(self, texts: Sequence[str]) -> np.ndarray:
    """Returns int32 ids [len(texts), max_len]."""
    if isinstance(texts, str):
      raise TypeError('Vectorizer expects a list of strings, got one string')
    out = np.zeros((len(texts), self.max_len), np.int32)
    for row, text in enumerate(texts):
      ids = [self._ids.get(token, OOV_ID) for token in self.tokenize(text)[:self.max_len]]
      out[row, :len(ids)] = ids
    return out

  def to_dict(self) -> dict:
    return {'format': FORMAT, 'vocab_size': self.vocab_size, 'max_len': self.max_len,
            'remove_stopwords': self.remove_stopwords, 'tokens': list(self.tokens)}

  @classmethod
  def from_dict(cls, data: dict, *, source: str = 'vocabulary') -> Vectorizer:
    if not isinstance(data, dict) or data.get('format') != FORMAT:
      raise DataError(f'{source}: not a vocabulary file (expected format {FORMAT!r})')
    return cls(data['tokens'], vocab_size=data['vocab_size'], max_len=data['max_len'],
               remove_stopwords=data['remove_stopwords'])

  def save(self, path: str) -> None:
    """Writes JSON atomically (local disk or a bucket): a reader never sees half a file."""
    storage.write_text(path, json.dumps(self.to_dict(), ensure_ascii=False))

  @classmethod
  def load(cls, path: str) -> Vectorizer:
    try:
      data = json.loads(storage.read_text(path))
    except (OSError, ValueError) as e:
      raise DataError(f'{path}: cannot read the vocabulary ({e})') from None
    return cls.from_dict(data, source=path)


def _split(text: str, remove_stopwords: bool) -> list[str]:
  tokens = standardize(text).split()
  if remove_stopwords:
    tokens = [token for token in tokens if token not in STOP_WORDS]
  return tokens
