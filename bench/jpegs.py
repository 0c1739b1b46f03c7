"""ImageNet-like JPEG folders for the input benchmarks: class subfolders of photos' size.

Real ImageNet cannot be downloaded here, so the images are generated: a smooth random
colour field (a few control points upsampled bicubically), a few filled shapes and mild
sensor-like noise, 500x375 at JPEG quality 90 by default. That gives files of about the
size of ImageNet's (tens of kB), decoded by the same libjpeg paths as photos; pure noise
would be several times larger and slower to decode than any photo.
"""

from __future__ import annotations

import os
import time

import numpy as np
from PIL import Image
from PIL import ImageDraw


def write_folder(root: str, count: int, *, classes: int = 100, size: tuple[int, int] = (500, 375),
                 quality: int = 90, seed: int = 0) -> float:
  """Writes `count` JPEGs as root/cNNN/NNNNNNN.jpg unless root already holds them.

  Args:
    root: the folder to fill.
    count: number of images, spread round-robin over the classes.
    classes: number of class subfolders.
    size: (width, height) of every image.
    quality: JPEG quality.
    seed: seeds every image's content.

  Returns:
    Seconds spent writing (0 when the folder was already complete).
  """
  marker = os.path.join(root, f'.complete_{count}_{classes}_{size[0]}x{size[1]}_q{quality}')
  if os.path.exists(marker):
    return 0.0
  start = time.perf_counter()
  rng = np.random.default_rng(seed)
  width, height = size
  # One noise tile, shifted per image: drawing fresh noise for every image would cost more
  # than encoding it.
  tile = rng.normal(0, 6, (2 * height, 2 * width, 3)).astype(np.float32)
  for c in range(classes):
    os.makedirs(os.path.join(root, f'c{c:03d}'), exist_ok=True)
  for i in range(count):
    points = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    image = Image.fromarray(points).resize(size, Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(3):
      x0, y0 = rng.integers(0, width), rng.integers(0, height)
      box = (x0, y0, x0 + rng.integers(20, width // 2), y0 + rng.integers(20, height // 2))
      color = tuple(int(v) for v in rng.integers(0, 256, 3))
      (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=color)
    dy, dx = rng.integers(0, height), rng.integers(0, width)
    pixels = np.asarray(image, np.float32) + tile[dy:dy + height, dx:dx + width]
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    image.save(os.path.join(root, f'c{i % classes:03d}', f'{i:07d}.jpg'), quality=quality)
  open(marker, 'w').close()
  return time.perf_counter() - start


def main(argv: list[str]) -> None:
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description='Writes a folder of ImageNet-like JPEGs.')
  parser.add_argument('root')
  parser.add_argument('count', type=int)
  parser.add_argument('--classes', type=int, default=100)
  parser.add_argument('--size', default='500x375', help='WIDTHxHEIGHT')
  args = parser.parse_args(argv)
  width, height = (int(v) for v in args.size.split('x'))
  seconds = write_folder(args.root, args.count, classes=args.classes, size=(width, height))
  print(f'{args.root}: {args.count} JPEGs ({"written in %.1f s" % seconds if seconds else "already there"})')


if __name__ == '__main__':
  import sys  # pylint: disable=g-import-not-at-top
  main(sys.argv[1:])
