"""Learning curves: PNG plots of loss and accuracy (or MAE) vs step, from metrics.jsonl."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use('Agg')  # Files only: training machines have no display.
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

from pipeline import reporting
from pipeline import storage


def plot_learning_curves(workdir: str) -> list[str]:
  """Writes WORKDIR/{loss,accuracy}.png, or {loss,mae}.png for a regression loss (train
  and eval curves); returns their paths."""
  records = reporting.read_jsonl(workdir)
  paths = []
  for metric in ('loss', 'accuracy', 'mae'):
    curves = {split: sorted({r['step']: r[f'{split}/{metric}'] for r in records
                             if f'{split}/{metric}' in r}.items()) for split in ('train', 'eval')}
    if not any(curves.values()):  # The metric of the other task.
      continue
    figure, axes = plt.subplots(figsize=(6, 4), dpi=100)
    for split, style in (('train', '-'), ('eval', 'o-')):
      if curves[split]:
        axes.plot(*zip(*curves[split]), style, label=split, markersize=3)
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
