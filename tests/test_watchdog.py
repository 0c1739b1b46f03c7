"""The stall watchdog: a process stuck anywhere (start-up, a data read, a peer that stopped)
exits non-zero with the stacks and the stuck phase in its log, instead of hanging."""

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
from PIL import Image

from pipeline import config as config_lib
from pipeline import watchdog
from pipeline.data import sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = 'configs/fashion_mnist_cnn.py:smoke'


def _env(devices=8):
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  return env


def _python(code, timeout=60):
  start = time.monotonic()
  proc = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], cwd=ROOT, env=_env(),
                        capture_output=True, text=True, timeout=timeout)
  return proc, time.monotonic() - start


def test_a_stalled_process_dumps_every_stack_names_the_phase_and_exits_75():
  proc, seconds = _python('''
      import threading, time
      from pipeline import watchdog
      def blocked_reader(lock):
        lock.acquire()  # Never released: the deadlocked thread the stacks must show.
      lock = threading.Lock()
      lock.acquire()
      threading.Thread(target=blocked_reader, args=(lock,), daemon=True).start()
      dog = watchdog.Watchdog(1.0).start()
      dog.progress('eval', 7, 3)
      time.sleep(60)
      ''')
  assert proc.returncode == watchdog.EXIT_CODE, proc.stderr[-3000:]
  assert seconds < 30, seconds
  assert re.search(r'no progress for \d+ s \(watchdog.timeout_s=1\) on process 0',
                   proc.stderr), proc.stderr[-3000:]
  assert 'stuck in eval at step 7, batch 3' in proc.stderr
  # faulthandler's dump: the main thread in sleep and the deadlocked one in acquire.
  assert 'Current thread' in proc.stderr and 'in blocked_reader' in proc.stderr


def test_a_thread_stuck_holding_the_gil_is_caught_by_the_fallback_timer():
  """C code that never releases the GIL freezes the stall thread too; faulthandler's own
  C timer, which the stall thread keeps pushing back, dumps the stacks and exits."""
  proc, seconds = _python('''
      import ctypes, time
      from pipeline import watchdog
      dog = watchdog.Watchdog(1.0).start()
      time.sleep(0.3)  # Lets the stall thread arm the timer once.
      ctypes.PyDLL(None).sleep(60)  # libc sleep called with the GIL held.
      ''')
  assert proc.returncode == 1, proc.stderr[-3000:]  # faulthandler's exit status.
  assert seconds < 30, seconds
  assert 'Timeout (0:00:0' in proc.stderr and 'Thread' in proc.stderr, proc.stderr[-3000:]


def test_progress_keeps_it_quiet_and_close_stops_it():
  proc, _ = _python('''
      import time
      from pipeline import watchdog
      with watchdog.Watchdog(0.5) as dog:
        for step in range(30):
          dog.progress('train', step)
          time.sleep(0.05)
        for _ in dog.watch(range(10), 'eval'):
          time.sleep(0.05)
      time.sleep(1.5)  # Well past the timeout: closed, it must not fire.
      print('finished at', dog.step)
      ''')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'finished at 29' in proc.stdout
  assert 'Watchdog' not in proc.stderr


def test_progress_is_cheap_and_takes_no_lock():
  """Called twice per train step: its cost must vanish next to any step (measured)."""
  calls = 200_000
  with watchdog.Watchdog(60.0) as dog:
    start = time.perf_counter()
    for step in range(calls):
      dog.progress('train', step)
    per_call = (time.perf_counter() - start) / calls
  print(f'Watchdog.progress: {per_call * 1e9:.0f} ns per call')
  assert dog.step == calls - 1
  assert per_call < 5e-6, per_call


def test_a_negative_timeout_is_refused():
  with pytest.raises(ValueError, match=r'timeout_s=-1.*must be >= 0'):
    watchdog.Watchdog(-1)


# The acceptance runs: pipeline.main as users run it.


def _image_folder(root, per_class=8):
  """A two-class image folder of real Fashion-MNIST test images, as PNG files."""
  fashion = config_lib.FASHION_MNIST_DIR
  pixels = sources.read_idx(os.path.join(fashion, 't10k-images-idx3-ubyte.gz'), ndim=3)
  labels = sources.read_idx(os.path.join(fashion, 't10k-labels-idx1-ubyte.gz'), ndim=1)
  for c in (0, 1):
    os.makedirs(os.path.join(root, f'c{c}'), exist_ok=True)
    for n, i in enumerate(np.flatnonzero(labels == c)[:per_class]):
      Image.fromarray(pixels[i]).save(os.path.join(root, f'c{c}', f'{n}.png'))
  return root


def _main(workdir, *flags, devices=8):
  return subprocess.Popen(
      [sys.executable, '-m', 'pipeline.main', f'--config={CONFIG}', f'--workdir={workdir}',
       *flags], cwd=ROOT, env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True)


def test_a_data_read_that_never_returns_stops_the_run_within_the_timeout(tmp_path):
  folder = _image_folder(str(tmp_path / 'images'))
  # A FIFO that nobody writes: opening it blocks forever, like a read on a hung NFS mount.
  os.mkfifo(os.path.join(folder, 'c1', 'stuck.png'))
  start = time.monotonic()
  proc = _main(str(tmp_path / 'run'), '--config.data.name=image_folder',
               f'--config.data.path={folder}', '--config.data.num_classes=2',
               '--config.train.global_batch_size=8', '--config.eval.batch_size=8',
               '--config.data.validation_fraction=0.25', '--config.watchdog.timeout_s=10')
  output, _ = proc.communicate(timeout=120)
  seconds = time.monotonic() - start
  print(f'stuck data read: run exited {proc.returncode} after {seconds:.1f} s')
  assert proc.returncode == watchdog.EXIT_CODE, output[-3000:]
  assert 'stuck in startup at step 0' in output, output[-3000:]
  # The stack shows where: Pillow opening the FIFO, called from the image folder's read
  # of the statistics sample (start-up opens no other file).
  assert 'in _decode' in output and 'images.py' in output, output[-5000:]
  assert seconds < 10 + 30, seconds


class _Output:
  """A child's merged output, read by a thread, so waiting for a line can time out."""

  def __init__(self, proc):
    self.lines = []
    self.thread = threading.Thread(target=lambda: self.lines.extend(proc.stdout), daemon=True)
    self.thread.start()

  @property
  def text(self):
    return ''.join(self.lines)

  def wait_for(self, needle, timeout):
    deadline = time.monotonic() + timeout
    while needle not in self.text:
      assert time.monotonic() < deadline, f'no {needle!r} in:\n{self.text[-3000:]}'
      time.sleep(0.2)


def test_a_data_read_that_hangs_mid_training_names_the_data_phase(tmp_path):
  folder = _image_folder(str(tmp_path / 'images'))
  proc = _main(str(tmp_path / 'run'), '--config.data.name=image_folder',
               f'--config.data.path={folder}', '--config.data.num_classes=2',
               '--config.train.global_batch_size=8', '--config.eval.batch_size=8',
               '--config.data.validation_fraction=0.25', '--config.train.num_steps=100000',
               '--config.train.eval_every_steps=100000', '--config.checkpoint.every_steps=100000',
               '--config.watchdog.timeout_s=10')
  try:
    output = _Output(proc)
    output.wait_for('Train call of 1 step(s) compiled', timeout=120)
    # Every image becomes a FIFO: the next read of any of them never returns.
    for c in (0, 1):
      for name in os.listdir(os.path.join(folder, f'c{c}')):
        path = os.path.join(folder, f'c{c}', name)
        os.remove(path)
        os.mkfifo(path)
    start = time.monotonic()
    proc.wait(timeout=60)
    seconds = time.monotonic() - start
    output.thread.join(10)
  finally:
    proc.kill()
  print(f'data read hung mid-training: exited {proc.returncode} {seconds:.1f} s after')
  assert proc.returncode == watchdog.EXIT_CODE, output.text[-3000:]
  assert re.search(r'stuck in data at step \d+', output.text), output.text[-3000:]
  assert 'in decode' in output.text, output.text[-5000:]  # The read thread, in Pillow's open.
  assert seconds < 10 + 30, seconds


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_a_stopped_peer_makes_the_other_process_exit_naming_it(tmp_path):
  """SIGSTOP freezes process 1 whole (its heartbeats too): process 0 must not hang."""
  address = f'127.0.0.1:{_free_port()}'
  procs = [_main(str(tmp_path / 'run'), f'--coordinator_address={address}',
                 '--num_processes=2', f'--process_id={i}', '--config.train.num_steps=100000',
                 '--config.train.log_every_steps=1', '--config.train.eval_every_steps=100000',
                 '--config.checkpoint.every_steps=100000', devices=4) for i in range(2)]
  try:
    outputs = [_Output(p) for p in procs]
    for output in outputs:
      output.wait_for('[3] ', timeout=240)  # Both are training.
    os.kill(procs[1].pid, signal.SIGSTOP)
    start = time.monotonic()
    procs[0].wait(timeout=150)
    seconds = time.monotonic() - start
    outputs[0].thread.join(10)
  finally:
    for proc in procs:
      if proc.poll() is None:
        os.kill(proc.pid, signal.SIGCONT)
      proc.kill()
      proc.wait()
  print(f'peer stopped: process 0 exited {procs[0].returncode} {seconds:.1f} s after')
  assert procs[0].returncode != 0
  # JAX's coordination service names the silent process ('tasks ... unhealthy: 1').
  assert re.search(r'stopped sending heartbeats\):\s*1\s', outputs[0].text), \
      outputs[0].text[-3000:]
  assert seconds < 120, seconds
