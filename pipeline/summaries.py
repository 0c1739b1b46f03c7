"""What TensorBoard shows besides scalars: input grids, misclassified examples, the config,
the model summary and hparams. Host-side and lead-process only; nothing here is jitted.
"""

from __future__ import annotations

import json
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tensorboard.plugins.hparams import api_pb2
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorboard.plugins.hparams import plugin_data_pb2

from pipeline import steps

MAX_GRID = 64  # Images per grid: enough to see the data, small enough for event files.


def image_grid(images: np.ndarray, columns: int = 8) -> np.ndarray:
  """[N, H, W, C] float images (any range) -> one [1, rows*H, cols*W, C] grid in [0, 1]."""
  images = np.asarray(images[:MAX_GRID], np.float32)
  low, high = images.min(), images.max()
  images = (images - low) / max(high - low, 1e-6)  # Undo normalization for display.
  n, h, w, c = images.shape
  rows = -(-n // columns)
  grid = np.ones((rows * (h + 1) + 1, columns * (w + 1) + 1, c), np.float32)
  for i, image in enumerate(images):
    r, col = divmod(i, columns)
    grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + col * (w + 1):1 + col * (w + 1) + w] = image
  return grid[None]


def misclassified(inputs: np.ndarray, labels: np.ndarray, predictions: np.ndarray,
                  mask: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int]]] | None:
  """The wrongly classified (real, unpadded) images and their (label, prediction) pairs."""
  wrong = np.flatnonzero(mask & (labels != predictions))[:MAX_GRID]
  if not wrong.size:
    return None
  return inputs[wrong], list(zip(labels[wrong].tolist(), predictions[wrong].tolist()))


def model_summary(model: nn.Module, input_shape: tuple[int, ...], input_dtype: Any) -> str:
  """Flax's table of layers, shapes and parameter counts, as markdown-ish text."""
  # tabulate runs an eager init: a deliberate one-off transfer, before the loop starts.
  with jax.transfer_guard('allow'):
    example = jnp.zeros((1, *input_shape), input_dtype)
    table = nn.tabulate(
        model, {'params': jax.random.PRNGKey(0), 'dropout': jax.random.PRNGKey(1)},
        console_kwargs={'width': 160, 'force_terminal': False})(example, train=False)
  return '```\n' + table + '\n```'


def config_text(config) -> str:
  return '```\n' + json.dumps(json.loads(config.to_json()), indent=2) + '\n```'


def hparams(config) -> dict[str, Any]:
  """The config's scalar values, flattened ('optimizer.learning_rate': 0.001, ...)."""
  flat = {}

  def walk(node, prefix):
    for key, value in node.items():
      if isinstance(value, dict):
        walk(value, f'{prefix}{key}.')
      elif isinstance(value, (bool, int, float, str)):
        flat[f'{prefix}{key}'] = value
      else:
        flat[f'{prefix}{key}'] = str(value)

  walk(json.loads(config.to_json()), '')
  return flat


def final_metrics(config) -> tuple[str, ...]:
  """The metrics a finished run ends with: the eval split's and, with
  `eval.final_split`, that split's and the step of the model scored on it."""
  names = steps.eval_metric_names()
  if config.eval.final_split:
    names += (*steps.eval_metric_names(config.eval.final_split), 'best_step')
  return names


def hparams_session(config, workdir: str, *,
                    finished: bool) -> tuple[dict[str, np.ndarray], dict[str, bytes]]:
  """The HParams dashboard's summaries for this run: (values, metadata) for
  `reporting.write_session`.

  The experiment declares the metrics. Left to infer them, TensorBoard pointed at the
  workdir itself names the run '.' and the metrics' group '.', looks their values up
  in run './.', which does not exist, and shows none (`metricValues: []`). Declared
  with the group '' (the session's own run) they resolve in every layout: a logdir
  that is the workdir or one above several workdirs. TensorBoard shows the last value
  of each metric's scalars, which are the final eval's: the loop always evaluates its
  last step.

  Every config key is an hparam. Its declared domain constrains no value (numbers and
  strings get none, booleans both values), because TensorBoard takes the experiment of
  one run for all the runs under a logdir, and its filters start from the declared
  domains: a domain of this run's values would hide runs with other values.

  Args:
    config: the run's config.
    workdir: the run's workdir, its name in the table ('Trial ID').
    finished: the run trained to its end (or stopped early) rather than being stopped;
      only then is the session's end (status success) written. An interrupted attempt's
      session has none (TensorBoard shows its status as unknown) until the resumed run
      finishes.

  Returns:
    The summary values (empty tensors: the content is all metadata) and their
    serialized metadata, keyed by the plugin's tags.
  """
  values = hparams(config)
  infos = []
  for name, value in sorted(values.items()):
    info = api_pb2.HParamInfo(name=name)
    if isinstance(value, bool):
      info.type = api_pb2.DATA_TYPE_BOOL
      info.domain_discrete.extend([False, True])
    elif isinstance(value, (int, float)):
      info.type = api_pb2.DATA_TYPE_FLOAT64
    else:
      info.type = api_pb2.DATA_TYPE_STRING
    infos.append(info)
  now = time.time()
  experiment = api_pb2.Experiment(
      hparam_infos=infos, time_created_secs=now,
      metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(group='', tag=tag))
                    for tag in final_metrics(config)])
  # TensorBoard groups (and averages) sessions by group name and shows it as the trial
  # ID: the workdir, as each is a run of its own, even where two share a config. (Its
  # default, the session's run, is '.' for a logdir that is the workdir.)
  start = plugin_data_pb2.SessionStartInfo(group_name=workdir, start_time_secs=now)
  for name, value in values.items():
    if isinstance(value, bool):
      start.hparams[name].bool_value = value
    elif isinstance(value, (int, float)):
      start.hparams[name].number_value = value
    else:
      start.hparams[name].string_value = value
  plugin_data = {
      hparams_metadata.EXPERIMENT_TAG: plugin_data_pb2.HParamsPluginData(experiment=experiment),
      hparams_metadata.SESSION_START_INFO_TAG:
          plugin_data_pb2.HParamsPluginData(session_start_info=start)}
  if finished:
    plugin_data[hparams_metadata.SESSION_END_INFO_TAG] = plugin_data_pb2.HParamsPluginData(
        session_end_info=plugin_data_pb2.SessionEndInfo(
            status=api_pb2.STATUS_SUCCESS, end_time_secs=now))
  empty = np.zeros((0,), np.float32)
  return ({tag: empty for tag in plugin_data},
          {tag: hparams_metadata.create_summary_metadata(data).SerializeToString()
           for tag, data in plugin_data.items()})
