"""Learning curves: PNG plots of loss and accuracy vs step, drawn from metrics.jsonl."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use('Agg')  # Files only: training machines have no display.
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

from pipeline import reporting
from pipeline import storage


def plot_learning_curves(workdir: str) -> list[str]:
  """Writes WORKDIR/{loss,accuracy}.png (train and eval curves); returns their paths."""
  records = reporting.read_jsonl(workdir)
  paths = []
  for metric in ('loss', 'accuracy'):
    figure, axes = plt.subplots(figsize=(6, 4), dpi=100)
    for split, style in (('train', '-'), ('eval', 'o-')):
      key = f'{split}/{metric}'
      points = sorted({r['step']: r[key] for r in records if key in r}.items())
      if points:
        axes.plot(*zip(*points), style, label=split, markersize=3)
    axes.set_xlabel('step')
    axes.set_ylabel(metric)
    axes.grid(alpha=0.3)
    axes.legend()
    path = storage.join(workdir, f'{metric}.png')
    figure.tight_layout()
    png = io.BytesIO()  # Rendered here, then written whole: local disk or a bucket.
    figure.savefig(png, format='png')
    plt.close(figure)
    storage.write_bytes(path, png.getvalue())
    paths.append(path)
  return paths
