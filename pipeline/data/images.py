"""Image ops: decode and probe files, crops, channel statistics, augmentation, normalization.

Crops that depend on an image's own size (the Inception-style random-resized crop, the
eval center crop) are chosen per example when it is decoded (`Crops`); everything after
decoding works on whole uint8 batches [B, H, W, C] in numpy, because a per-example Python
loop would cost more than the model step on the small CPU hosts.

Resizing is Pillow's antialiased bilinear filter on the crop alone (nothing outside the
crop box contributes): within 1 gray level of `tf.image.resize(..., 'bilinear',
antialias=True)` of the same crop (tests/test_data.py). Pillow's bicubic clips its 8-bit
intermediate pass, up to 3 levels off TensorFlow's float result.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from typing import Any, Callable

import numpy as np
from PIL import Image

from pipeline import storage
from pipeline.data.errors import DataError

# Files with these suffixes are treated as images; anything else in a folder is ignored
# (README files, .DS_Store, label lists).
EXTENSIONS = ('.bmp', '.gif', '.jpeg', '.jpg', '.png', '.ppm', '.tif', '.tiff', '.webp')
_INCEPTION_SALT = 0x1C0  # Keeps crop draws apart from the flip and pad bits of a key.

# (top, left, height, width) of a crop, in pixels of the decoded image.
Box = tuple[int, int, int, int]
# Given a decoded image's (height, width), the box to crop before resizing.
BoxFn = Callable[[int, int], Box]


@dataclasses.dataclass(frozen=True)
class Crops:
  """The crops of the ImageNet recipe, chosen from each image's own size.

  Train (inception=True): the random-resized crop of Inception, as
  `tf.image.sample_distorted_bounding_box` draws it (aspect ratio uniform in `aspect`,
  then the height uniform over the sizes whose area is in `area`); after `attempts`
  misses, the eval center crop. Eval (center=True): the central square of side
  min(h, w) * size / (size + padding) (the Flax ImageNet example's crop padding of 32:
  resize the shorter side to 256, take the central 224). Both are resized to size x size.
  """
  size: int  # Output side (data.image_size).
  inception: bool = False  # data.inception_crop.
  area: tuple[float, float] = (0.08, 1.0)  # Share of the image area.
  aspect: tuple[float, float] = (3 / 4, 4 / 3)  # Width / height.
  attempts: int = 10
  center: bool = False  # data.eval_center_crop.
  padding: int = 32  # data.crop_padding.

  def train_box(self, key: int) -> BoxFn | None:
    """The train crop of the example whose key is `key`, or None (squash-resize)."""
    if not self.inception:
      return None
    return lambda height, width: (inception_box(key, height, width, area=self.area,
                                                aspect=self.aspect, attempts=self.attempts)
                                  or self.center_box(height, width))

  def eval_box(self) -> BoxFn | None:
    """The eval crop, or None (squash-resize)."""
    return self.center_box if self.center else None

  def center_box(self, height: int, width: int) -> Box:
    side = max(1, int(self.size / (self.size + self.padding) * min(height, width)))
    return (height - side + 1) // 2, (width - side + 1) // 2, side, side


def inception_box(key: int, height: int, width: int, *, area: tuple[float, float],
                  aspect: tuple[float, float], attempts: int) -> Box | None:
  """A random crop box of (height, width), a pure function of `key`; None if none fits.

  Each attempt draws a width/height ratio uniformly from `aspect`, then a height uniformly
  from those whose crop area (rounded to whole pixels) lies in `area` x the image area and
  that fit the image, then a uniform offset. This is the distribution of
  `tf.image.sample_distorted_bounding_box` with the whole image as the object box and
  min_object_covered=0, which tests/test_data.py compares against.
  """
  rng = np.random.default_rng([_INCEPTION_SALT, int(key) % 2**64])
  min_area, max_area = area[0] * height * width, area[1] * height * width
  for _ in range(attempts):
    ratio = rng.uniform(*aspect)
    low = round(math.sqrt(min_area / ratio))
    high = round(math.sqrt(max_area / ratio))
    if round(high * ratio) > width:  # The tallest crop whose width still fits.
      high = int((width + 0.5) / ratio)
      if round(high * ratio) > width:
        high -= 1
    high = min(high, height)
    low = min(low, high)
    crop_h = int(rng.integers(low, high + 1))
    crop_w = round(crop_h * ratio)
    # Rounding to whole pixels can step just outside the area range: one pixel back in.
    if crop_w * crop_h < min_area:
      crop_h += 1
      crop_w = round(crop_h * ratio)
    if crop_w * crop_h > max_area:
      crop_h -= 1
      crop_w = round(crop_h * ratio)
    if (min_area <= crop_w * crop_h <= max_area and 0 < crop_w <= width
        and 0 < crop_h <= height):
      top = int(rng.integers(0, height - crop_h + 1))
      left = int(rng.integers(0, width - crop_w + 1))
      return top, left, crop_h, crop_w
  return None


def probe(path: str) -> tuple[int, int]:
  """Reads the header and checks the file's structure without decoding pixels.

  Returns:
    (height, width).

  Raises:
    DataError naming the file if it is not a readable image.
  """
  try:
    with Image.open(path) as image:
      width, height = image.size
      image.verify()  # Checks chunk CRCs for PNG; a truncated PNG fails here.
  # Pillow's format plugins raise many types (OSError, SyntaxError, struct.error, ...) on
  # corrupt bytes; any of them means the same thing to us.
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f'{path}: not a readable image ({type(e).__name__}: {e})') from None
  return height, width


def decode(item: Any, *, size: tuple[int, int] | None, channels: int,
           name: str | None = None, box: BoxFn | None = None) -> np.ndarray:
  """Decodes a path, encoded bytes, PIL image or uint8 array into uint8 [H, W, channels].

  Args:
    item: an image file path, the bytes of an encoded image (a TFDS image read
      undecoded), a PIL image, or a uint8 array [H, W] or [H, W, C].
    size: (height, width) to resize to (bilinear), or None to keep the size.
    channels: 1 (gray) or 3 (RGB).
    name: what to call the item in errors (defaults to the path).
    box: picks the crop, from the image's (height, width), taken before resizing.
  """
  if isinstance(item, (str, os.PathLike, bytes)):
    if isinstance(item, bytes):
      name, source = name or 'encoded image', io.BytesIO(item)
    else:
      name = name or os.fspath(item)
      # Read whole, in one call (an image is small): Pillow parses the header of an open
      # file with dozens of small reads, which cost more than reading the file.
      if storage.is_local(item):
        with open(item, 'rb') as f:
          source = io.BytesIO(f.read())
      else:
        source = io.BytesIO(storage.read_bytes(item))
    try:
      try:
        with Image.open(source) as image:
          return _to_array(image, size, channels, box, opened=True)
      except _Redecode:
        source.seek(0)
        with Image.open(source) as image:
          image.load()
          return _to_array(image, size, channels, box)
    except DataError:
      raise
    except Exception as e:  # pylint: disable=broad-except  # See probe().
      raise DataError(f'{name}: cannot decode image ({type(e).__name__}: {e})') from None
  if isinstance(item, Image.Image):
    return _to_array(item, size, channels, box)
  array = np.asarray(item)
  if array.dtype != np.uint8 or array.ndim not in (2, 3):
    raise DataError(f'{name or "image"}: expected a uint8 array [H, W] or [H, W, C], got '
                    f'{array.dtype} {array.shape}')
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  return _to_array(Image.fromarray(array), size, channels, box)


def _to_array(image: Image.Image, size: tuple[int, int] | None, channels: int,
              box: BoxFn | None = None, *, opened: bool = False) -> np.ndarray:
  """`opened`: `image` was opened here and is not loaded yet, so it may be loaded in part."""
  mode = 'L' if channels == 1 else 'RGB'
  if box is not None:
    top, left, height, width = box(image.height, image.width)
    if opened:
      _load_rows(image, top + height)
    # Cropped first, not resize(box=...): that filter reaches outside the box.
    image = image.crop((left, top, left + width, top + height))
  if image.mode != mode:  # convert() copies even when the mode is already right.
    image = image.convert(mode)
  if size and image.size != (size[1], size[0]):
    image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
  array = np.asarray(image, np.uint8)
  return array[..., None] if channels == 1 else array


def _load_rows(image: Image.Image, rows: int) -> None:
  """Decodes only the first `rows` rows of a JPEG that is not loaded yet.

  libjpeg decodes top to bottom, so the rows below a crop need not be decoded at all:
  about a quarter of the decode for an Inception crop, and the pixels above the last row
  are exactly those of a full decode (tests/test_data.py). TensorFlow's
  `decode_and_crop_jpeg` stops after the crop window in the same way. Other formats, and
  crops that reach the last row, are loaded whole by the caller's crop.
  """
  if (image.format != 'JPEG' or rows >= image.height or len(getattr(image, 'tile', ())) != 1
      or image.tile[0].codec_name != 'jpeg' or image.decoderconfig):
    return
  tile = image.tile[0]
  full = image.size
  image.tile = [tile._replace(extents=(0, 0, full[0], rows))]
  image._size = (full[0], rows)  # pylint: disable=protected-access  # What load() fills.
  try:
    image.load()
  except OSError:
    # libjpeg ends a decode stopped early with an error once the rows are in. A file that
    # is corrupt or cut short above the crop's last row stops before that row, which then
    # stays as allocated (zeros): decode such an image again whole, which names the error
    # (or, for a crop that really ends in a black row, gives the same pixels).
    if image.crop((0, rows - 1, full[0], rows)).getbbox() is None:
      raise _Redecode() from None


class _Redecode(Exception):
  """The early-stopped decode of `_load_rows` cannot be trusted; decode the file whole."""


def convert(images: np.ndarray, *, size: tuple[int, int] | None, channels: int) -> np.ndarray:
  """Brings an in-memory uint8 batch [N, H, W, C] to the configured size and channels."""
  if images.shape[-1] != channels:
    if channels == 3:
      images = np.repeat(images, 3, axis=-1)
    else:  # ITU-R 601 luma, as Pillow's convert('L').
      weights = np.array([299, 587, 114], np.uint32)
      images = ((images.astype(np.uint32) @ weights + 500) // 1000).astype(np.uint8)[..., None]
  if size and images.shape[1:3] != tuple(size):
    images = np.stack([decode(image, size=size, channels=channels) for image in images])
  return images


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and std of uint8 images [N, H, W, C] on the [0, 1] scale.

  Works in float32 chunks: a whole-array `astype` of 60k Fashion-MNIST images would be a
  376 MB temporary, and numpy's std on uint8 takes 0.7 s where this takes 0.06 s.
  """
  channels = images.shape[-1]
  total = np.zeros(channels)
  squares = np.zeros(channels)
  count = 0
  for start in range(0, len(images), 4096):
    pixels = images[start:start + 4096].reshape(-1, channels).astype(np.float32)
    total += pixels.sum(0, dtype=np.float64)
    squares += np.einsum('ij,ij->j', pixels, pixels)
    count += len(pixels)
  mean = total / count
  std = np.sqrt(np.maximum(squares / count - mean**2, 1e-6))
  return (mean / 255).astype(np.float32), (std / 255).astype(np.float32)


def normalize(images: np.ndarray, mean: np.ndarray | None,
              std: np.ndarray | None) -> np.ndarray:
  """uint8 [..., C] -> float32: x / 255, then (x - mean) / std when stats are given."""
  # In place on the one float32 copy, and over whole rows: numpy's inner loop over a
  # trailing axis of 3 channels ran at 1.5 ms per 224x224 RGB image, rows of W*C values at
  # a tenth of that.
  out = images.astype(np.float32)
  if mean is None:
    out *= np.float32(1 / 255)
    return out
  channels = images.shape[-1]
  rows = out.reshape(-1, images.shape[-2] * channels)
  repeat = rows.shape[1] // channels
  rows *= np.tile((1.0 / (255.0 * std)).astype(np.float32), repeat)
  rows += np.tile((-mean / std).astype(np.float32), repeat)
  return out


def augment(images: np.ndarray, *, seed: int, positions: np.ndarray, pad: int,
            flip: bool, keys: np.ndarray | None = None) -> np.ndarray:
  """Random crop after zero padding, and random horizontal flip, on a uint8 batch.

  Each example's crop offset and flip come from a hash of (seed, global stream position),
  so an example gets the same augmentation whichever process, batch or resume reads it.

  Args:
    images: uint8 [B, H, W, C].
    seed: the run's seed.
    positions: int [B], global stream positions of the examples.
    pad: pixels of zero padding on each side before cropping back to H x W (0 = no crop).
    flip: whether to flip half of the examples left-right.
    keys: `example_keys(seed, positions)`, if the caller has them already.

  Returns:
    uint8 [B, H, W, C]; with flips alone, possibly a view of `images` (reversed strides).
  """
  if not pad and not flip:
    return images
  b, h, w, _ = images.shape
  keys = example_keys(seed, positions) if keys is None else keys
  if not pad:
    # Flip alone. One example at a time (decoded images), a flip is a view: the batch
    # that stacks the examples makes the one copy. Copying here cost a tenth of a JPEG's
    # decode and resize.
    flipped = (keys >> np.uint64(63)).astype(bool)
    if flipped.all():
      return images[:, :, ::-1]
    if not flipped.any():
      return images
    return np.where(flipped[:, None, None, None], images[:, :, ::-1], images)
  rows = np.broadcast_to(np.arange(h), (b, h))
  cols = np.broadcast_to(np.arange(w), (b, w))
  if pad:
    images = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    span = np.uint64(2 * pad + 1)
    rows = rows + (keys % span).astype(np.intp)[:, None]
    cols = cols + ((keys >> np.uint64(16)) % span).astype(np.intp)[:, None]
  if flip:
    flipped = (keys >> np.uint64(63)).astype(bool)
    cols = np.where(flipped[:, None], cols[:, ::-1], cols)
  # One gather does crop and flip together: out[i, y, x] = images[i, rows[i, y], cols[i, x]].
  return images[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


def example_keys(seed: int, positions: np.ndarray) -> np.ndarray:
  """uint64 pseudo-random keys, one per position, a pure function of (seed, position)."""
  base = _mix64(np.array([seed % 2**64], np.uint64))
  return _mix64(positions.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + base)


def _mix64(z: np.ndarray) -> np.ndarray:
  # The splitmix64 finalizer: consecutive counters map to unrelated 64-bit values, which a
  # vectorized counter-based generator needs (numpy's Generators cannot be keyed per row).
  z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return z ^ (z >> np.uint64(31))
