"""What a person sees in TensorBoard: a real `tensorboard` server over the workdirs of real
runs, queried through the HParams plugin's HTTP API with the requests its dashboard sends."""

import glob
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from configs import fashion_mnist_cnn
from pipeline import reporting
from pipeline import train

STATUSES = ['STATUS_UNKNOWN', 'STATUS_SUCCESS', 'STATUS_FAILURE', 'STATUS_RUNNING']


def _config(num_steps):
  config = fashion_mnist_cnn.get_config('smoke')
  config.update_from_flattened_dict({
      'data.name': 'synthetic', 'data.path': '', 'data.synthetic_train_size': 256,
      'data.synthetic_eval_size': 128, 'eval.batch_size': 128, 'train.num_steps': num_steps,
      'train.eval_every_steps': 4, 'checkpoint.every_steps': 4,
      'optimizer.warmup_steps': 2})
  return config


class TensorBoard:
  """`tensorboard --logdir LOGDIR` in a subprocess on a free local port."""

  START_TIMEOUT_S = 60

  def __init__(self, logdir, log_path):
    with socket.socket() as sock:  # A free port; TensorBoard binds it a moment later.
      sock.bind(('127.0.0.1', 0))
      self.port = sock.getsockname()[1]
    tensorboard = os.path.join(os.path.dirname(sys.executable), 'tensorboard')
    self.log_path = log_path
    self._log = open(log_path, 'w', encoding='utf-8')
    self.proc = subprocess.Popen(
        [tensorboard, '--logdir', logdir, '--host', '127.0.0.1', '--port', str(self.port)],
        stdout=self._log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + self.START_TIMEOUT_S
    while True:
      if self.proc.poll() is not None:
        self.fail(f'exited with code {self.proc.returncode}')
      try:
        urllib.request.urlopen(self.url('/data/plugins_listing'), timeout=5).read()
        return
      except (urllib.error.URLError, ConnectionError):
        if time.monotonic() > deadline:
          self.fail(f'did not answer on port {self.port} in {self.START_TIMEOUT_S} s')
        time.sleep(0.5)

  def url(self, path):
    return f'http://127.0.0.1:{self.port}{path}'

  def fail(self, why):
    self.close()
    with open(self.log_path, encoding='utf-8') as log:
      pytest.fail(f'TensorBoard {why}; its log:\n{log.read()[-3000:]}')

  def post(self, route, body):
    request = urllib.request.Request(
        self.url(f'/data/plugin/hparams/{route}'), data=json.dumps(body).encode(),
        headers={'Content-Type': 'application/json'})
    with urllib.request.urlopen(request, timeout=30) as response:
      return json.loads(response.read())

  def session_groups(self, num_sessions, timeout_s=60):
    """The dashboard's two requests, repeated until TensorBoard has loaded `num_sessions`
    finished sessions (it reads the event files in the background)."""
    deadline = time.monotonic() + timeout_s
    while True:
      experiment = self.post('experiment', {'experimentName': ''})
      # As the dashboard's table asks: every hparam and metric of the experiment.
      col_params = ([{'hparam': h['name'], 'includeInResult': True}
                     for h in experiment.get('hparamInfos', [])]
                    + [{'metric': m['name'], 'includeInResult': True}
                       for m in experiment.get('metricInfos', [])])
      groups = self.post('session_groups', {
          'experimentName': '', 'allowedStatuses': STATUSES, 'colParams': col_params,
          'startIndex': 0, 'sliceSize': 1000000}).get('sessionGroups', [])
      sessions = [s for g in groups for s in g['sessions']]
      if len(sessions) >= num_sessions and all(s['status'] == 'STATUS_SUCCESS'
                                               for s in sessions):
        return experiment, groups
      if time.monotonic() > deadline:
        self.fail(f'showed {groups} after {timeout_s} s, not {num_sessions} finished sessions')
      time.sleep(0.5)

  def close(self):
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait(timeout=30)
    self._log.close()


@pytest.fixture
def tensorboard(tmp_path):
  started = []

  def start(logdir):
    started.append(TensorBoard(logdir, str(tmp_path / f'tensorboard{len(started)}.log')))
    return started[-1]

  yield start
  for server in started:
    server.close()


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A workdir trained 4 steps, then resumed to 8 (two attempts, one run)."""
  workdir = str(tmp_path_factory.mktemp('runs') / 'resumed')
  train.train_and_evaluate(_config(4), workdir)
  train.train_and_evaluate(_config(8), workdir)
  return workdir


def _final_eval(workdir):
  return [r for r in reporting.read_jsonl(workdir) if 'eval/accuracy' in r][-1]


def _metric(group_or_session, tag):
  values = {v['name']['tag']: v for v in group_or_session['metricValues']
            if v['name']['group'] == ''}
  assert tag in values, (tag, group_or_session['metricValues'])
  return values[tag]


def _assert_final_metrics(group, workdir):
  final = _final_eval(workdir)
  assert final['step'] == 8
  for tag in ('eval/accuracy', 'eval/loss'):
    value = _metric(group, tag)
    assert value['value'] == pytest.approx(final[tag], rel=1e-6)
    assert value['trainingStep'] == final['step']
    assert _metric(group['sessions'][0], tag)['value'] == value['value']


def test_hparams_table_shows_the_final_eval_metrics(run, tensorboard):
  # TensorBoard pointed at the workdir itself: its run is '.', where metrics that
  # TensorBoard infers find no values.
  experiment, groups = tensorboard(run).session_groups(1)
  assert {m['name']['tag'] for m in experiment['metricInfos']} == {'eval/loss', 'eval/accuracy'}
  assert {h['name'] for h in experiment['hparamInfos']} >= {'train.num_steps', 'data.name'}
  # Both attempts wrote their session: one row, with the config the run finished with.
  assert len(groups) == 1 and len(groups[0]['sessions']) == 1, groups
  _assert_final_metrics(groups[0], run)
  assert groups[0]['name'] == run  # The table's trial ID.
  assert groups[0]['hparams']['data.name'] == 'synthetic'
  assert groups[0]['hparams']['train.num_steps'] == 8
  assert len(glob.glob(os.path.join(run, f'*{reporting.SESSION_EVENTS_SUFFIX}'))) == 1


def test_hparams_table_over_a_logdir_of_workdirs(run, tensorboard):
  _, groups = tensorboard(os.path.dirname(run)).session_groups(1)
  assert [s['name'] for g in groups for s in g['sessions']] == ['resumed'], groups
  _assert_final_metrics(groups[0], run)
