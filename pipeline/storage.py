"""The files of a run's workdir, on local disk or in a bucket (gs://), through etils.epath.

A workdir may be a local directory or a gs:// URL (the TPU VM command). Everything the
pipeline writes there besides checkpoints (Orbax) and TensorBoard events (TensorFlow's
writer, which speaks gs:// itself) goes through these few functions, so `gs://B/run`
never turns into a local directory `./gs:/B/run`. Local paths keep the plain `os` calls
they always had: the same atomic renames, the same appends.

An object store differs from a disk in two ways that matter here: an object is written
whole when its writer closes (readers see the old or the new object, never half, so no
temporary file is needed) but cannot be appended to, and there is no rename.
"""

from __future__ import annotations

import os

from etils import epath


def is_local(path: str | os.PathLike) -> bool:
  """Whether `path` names local disk (not gs://, s3://, ...)."""
  return '://' not in os.fspath(path)


def join(directory: str | os.PathLike, *names: str) -> str:
  if is_local(directory):
    return os.path.join(directory, *names)
  return os.fspath(epath.Path(directory).joinpath(*names))


def exists(path: str | os.PathLike) -> bool:
  return os.path.exists(path) if is_local(path) else epath.Path(path).exists()


def is_dir(path: str | os.PathLike) -> bool:
  """Whether `path` is a directory; in a bucket, whether any object lies under it."""
  return os.path.isdir(path) if is_local(path) else epath.Path(path).is_dir()


def make_dirs(path: str | os.PathLike) -> None:
  """Creates `path` and its parents (a no-op for a bucket, which has no directories)."""
  if is_local(path):
    os.makedirs(path, exist_ok=True)
  # Buckets: a directory exists once an object lies under it. TensorFlow's mkdir would
  # write a placeholder object `run/`, which nothing needs.


def read_text(path: str | os.PathLike) -> str:
  return epath.Path(path).read_text(encoding='utf-8')


def read_bytes(path: str | os.PathLike) -> bytes:
  return epath.Path(path).read_bytes()


def list_dir(path: str | os.PathLike) -> list[str]:
  """The paths of the entries of directory `path`, sorted by name."""
  if is_local(path):
    return [os.path.join(path, name) for name in sorted(os.listdir(path))]
  return sorted(os.fspath(child) for child in epath.Path(path).iterdir())


def is_file(path: str | os.PathLike) -> bool:
  return os.path.isfile(path) if is_local(path) else epath.Path(path).is_file()


def write_text(path: str | os.PathLike, text: str) -> None:
  """Writes `text` so that a concurrent reader never sees half of it."""
  if not is_local(path):
    epath.Path(path).write_text(text, encoding='utf-8')  # Committed whole on close.
    return
  tmp = f'{os.fspath(path)}.tmp{os.getpid()}'
  with open(tmp, 'w', encoding='utf-8') as f:
    f.write(text)
  os.replace(tmp, path)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Like `write_text`, for bytes (PNG files)."""
  if not is_local(path):
    epath.Path(path).write_bytes(data)
    return
  tmp = f'{os.fspath(path)}.tmp{os.getpid()}'
  with open(tmp, 'wb') as f:
    f.write(data)
  os.replace(tmp, path)


def move_tree(source: str | os.PathLike, target: str | os.PathLike) -> None:
  """Moves the file or directory `source` to `target`, which must not exist.

  Locally one atomic rename. A bucket has no rename: every object is copied first and the
  sources are deleted only once all copies exist, so an interruption leaves both (or a
  partial target beside the intact source), never neither. In GCS the copies are made by
  the service (no bytes through this host, whatever the checkpoint's size), and commit
  markers are deleted first, so a half-deleted step never looks committed to Orbax.
  """
  if is_local(source):
    os.rename(source, target)
    return
  source, target = os.fspath(source).rstrip('/'), os.fspath(target).rstrip('/')
  if exists(target):
    raise FileExistsError(f'{target} exists; not moving {source} over it.')
  if source.startswith('gs://'):
    _move_gcs(source, target)
    return
  src, dst = epath.Path(source), epath.Path(target)
  if not src.is_dir():
    src.copy(dst)
    src.unlink()
    return
  for root, _, files in src.walk():
    for name in files:
      (root / name).copy(dst / (root / name).relative_to(src))
  src.rmtree()


def _move_gcs(source: str, target: str) -> None:
  from google.cloud import storage  # pylint: disable=g-import-not-at-top  # gs:// only.
  bucket_name, prefix = source[len('gs://'):].split('/', 1)
  target_bucket, target_prefix = target[len('gs://'):].split('/', 1)
  client = storage.Client()
  bucket, destination = client.bucket(bucket_name), client.bucket(target_bucket)
  blobs = [b for b in client.list_blobs(bucket_name, prefix=prefix)
           if b.name == prefix or b.name.startswith(prefix + '/')]
  if not blobs:
    raise FileNotFoundError(f'{source}: no such file or directory.')
  for blob in blobs:
    new = destination.blob(target_prefix + blob.name[len(prefix):])
    token, _, _ = new.rewrite(blob)
    while token is not None:  # Large objects are rewritten in several calls.
      token, _, _ = new.rewrite(blob, token=token)
  blobs.sort(key=lambda b: not b.name.endswith('commit_success.txt'))
  for blob in blobs:
    bucket.delete_blob(blob.name, generation=blob.generation)
