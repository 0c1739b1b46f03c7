"""Multi-process set-up: `jax.distributed` init, the lead process, named barriers.

`initialize()` runs before anything touches a JAX backend. It always starts the
distributed runtime, even for a single process, because that is what installs JAX's
preemption sync manager, which `preemption.StopRequest` relies on. Where
the processes come from:

* explicit flags (`--coordinator_address --num_processes --process_id`): local
  multi-process runs, e.g. `launch/local.sh`;
* a cluster JAX can detect (Cloud TPU VM, SLURM, Open MPI): JAX reads the topology
  from the environment, so the launch scripts pass no coordinator flags;
* neither: a one-process "cluster" on 127.0.0.1 with a free port.

`check_platform()` follows it: with `--expect_platform=gpu|tpu` (the GPU and TPU
launchers pass it) a process whose JAX found other devices stops before any training,
naming the jax build to install.

When a process dies, the survivors must not hang in their next collective. The
coordination service declares a process dead after `--heartbeat_timeout_s` without a
heartbeat and aborts the others with a message naming it (measured: 57 s after a
SIGKILL with the default 60 s; at once if process 0, the coordinator, dies). A process
that raises exits at once rather than waiting in JAX's exit barrier, so that the same
applies to crashes; and one that is alive but makes no progress (a hung read, a
deadlock) exits through its stall watchdog (pipeline/watchdog.py), so it applies to
stalls too. A frozen process (SIGSTOP) sends no heartbeats: measured, the other exits
33-50 s later with the default 60 s, naming it. Stopping a process takes SIGKILL: once
the runtime is up, SIGTERM only marks a preemption (the loop saves and exits at its next
step).
"""

from __future__ import annotations

import os
import socket
import sys
import time
from typing import Any, Callable

from absl import flags
from absl import logging
import jax
from jax._src import clusters as jax_clusters
from jax._src import distributed as jax_distributed
from jax._src import xla_bridge

from pipeline import exits

_COORDINATOR_ADDRESS = flags.DEFINE_string(
    'coordinator_address', '',
    'host:port of process 0\'s coordinator; \'\' = auto (cluster or one local process).')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, 'Number of processes in the job (None = auto).')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, 'Index of this process, 0..num_processes-1 (None = auto).')
_DISTRIBUTED_TIMEOUT_S = flags.DEFINE_integer(
    'distributed_timeout_s', 300,
    'Seconds to wait for all processes to connect at start, and for all to finish at exit.')
_HEARTBEAT_TIMEOUT_S = flags.DEFINE_integer(
    'heartbeat_timeout_s', 60,
    'A process silent this long is declared dead and the survivors exit.')
_BARRIER_TIMEOUT_S = flags.DEFINE_float(
    'barrier_timeout_s', 600, 'Default timeout of barrier() in seconds.')
_EXPECT_PLATFORM = flags.DEFINE_enum(
    'expect_platform', '', ['', 'cpu', 'gpu', 'tpu'],
    'Stop at start unless JAX runs on this platform (\'\' = any). The GPU and TPU '
    'launchers pass it, so a CPU-only jaxlib fails loudly instead of training on CPU.')

# Who passes --expect_platform, and how to get that platform's build of the pinned jax.
_PLATFORM_HINTS = {
    'gpu': ('launch/slurm.sbatch passes it when --gpus-per-node > 0',
            "Install the GPU build of the pinned jax: pip install -c requirements.lock "
            "'jax[cuda12]=={version}' (launch/slurm.sbatch "
            'does so before submitting unless --no-jax-install), and check that the job '
            'was given GPUs (nvidia-smi, CUDA_VISIBLE_DEVICES)'),
    'tpu': ('launch/tpu_vm.sh passes it',
            "Install the TPU build of the pinned jax: pip install -c requirements.lock "
            "'jax[tpu]=={version}' (launch/tpu_vm.sh does so on every worker), and check "
            'that this is a TPU VM'),
    'cpu': ('given on the command line', 'Set JAX_PLATFORMS=cpu to run on the CPU'),
}

# Prefix of every key this module writes to the coordinator's key-value store, so that
# they cannot collide with the keys JAX, Orbax or grain write there.
_KV_PREFIX = 'pipeline_barrier'


def _flag(holder: flags.FlagHolder) -> Any:
  """The flag's value; unlike `holder.value` it also works before flags are parsed.

  Before parsing (tests, notebooks) it is the default, or what `flagsaver` set.
  """
  return flags.FLAGS[holder.name].value


def detected_cluster() -> str | None:
  """Name of the cluster environment JAX would auto-detect (e.g. 'SlurmCluster'), or None.

  Uses JAX's own detectors so that our choice and JAX's never disagree. Opt-in
  detectors (mpi4py) are skipped, as JAX skips them when no method is named.
  """
  for env in jax_clusters.ClusterEnv._cluster_types:  # pylint: disable=protected-access
    if not env.opt_in_only_method and env.is_env_present():
      return env.__name__
  return None


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def initialize() -> None:
  """Starts `jax.distributed` from the flags or the cluster environment; idempotent.

  Raises:
    ValueError: explicit flags that do not describe a job (e.g. --num_processes=2
      without --coordinator_address outside a cluster).
    RuntimeError: a multi-process job asked for after JAX was already used in this
      process (the backend can no longer join a cluster).
  """
  if jax.distributed.is_initialized():
    return
  address = _flag(_COORDINATOR_ADDRESS) or None
  num_processes = _flag(_NUM_PROCESSES)
  process_id = _flag(_PROCESS_ID)
  cluster = detected_cluster()
  alone = cluster is None and address is None and num_processes in (None, 1) and not process_id
  if alone:
    # A plain machine: a one-process cluster only to get the preemption sync manager.
    address, num_processes, process_id = f'127.0.0.1:{_free_port()}', 1, 0
  elif cluster is None and (address is None or num_processes is None or process_id is None):
    missing = [f'--{name}' for name, value in (('coordinator_address', address),
                                               ('num_processes', num_processes),
                                               ('process_id', process_id)) if value is None]
    raise ValueError(
        'No cluster environment (TPU VM, SLURM, Open MPI) detected, so a multi-process '
        f'run needs all three flags; missing: {", ".join(missing)}.')

  if xla_bridge.backends_are_initialized():
    # Something ran JAX before us (a test, a notebook). A lone process can carry on
    # without the runtime; only preemption sync is lost. A real job cannot.
    if (num_processes or 1) > 1 or cluster is not None:
      raise RuntimeError('multihost.initialize() must run before any JAX computation '
                         'or jax.devices() call in a multi-process job.')
    logging.warning('JAX was used before multihost.initialize(); running without '
                    'jax.distributed, so preemption sync is off.')
    return

  if alone:
    # With a distributed client, JAX's CPU backend does every collective through gloo's
    # TCP sockets, also those among one process's own devices: on 8 fake CPU devices
    # the default CNN trained at 580 examples/s that way, 1,870 in-process.
    jax.config.update('jax_cpu_collectives_implementation', None)
  logging.info('jax.distributed.initialize(coordinator=%s, num_processes=%s, '
               'process_id=%s) cluster=%s', address, num_processes, process_id, cluster)
  jax.distributed.initialize(
      coordinator_address=address,
      num_processes=num_processes,
      process_id=process_id,
      initialization_timeout=_flag(_DISTRIBUTED_TIMEOUT_S),
      heartbeat_timeout_seconds=_flag(_HEARTBEAT_TIMEOUT_S),
      # How long a finished process waits at exit for the others, which may still be
      # finishing a checkpoint. A peer that died meanwhile is caught by the heartbeat,
      # so this need not be short.
      shutdown_timeout_seconds=_flag(_DISTRIBUTED_TIMEOUT_S),
  )
  if num_processes is None or num_processes > 1:
    _exit_at_once_on_uncaught_exception()


def check_platform() -> None:
  """Stops the run if JAX's devices are not of the --expect_platform kind.

  Runs right after `initialize()`: a GPU job whose environment holds the CPU-only
  jaxlib (the pins name that one) would otherwise train on the host CPU, slowly and
  without a word.

  Raises:
    RuntimeError: JAX found another platform; the message names the expected one,
      what JAX found and how to install the matching jax build.
  """
  expected = _flag(_EXPECT_PLATFORM)
  if not expected:
    return
  found = jax.default_backend()
  if found == expected:
    return
  passed_by, fix = _PLATFORM_HINTS[expected]
  devices = jax.local_devices()
  raise RuntimeError(
      f'expected {expected} devices (--expect_platform={expected}; {passed_by}) but JAX '
      f'found only {found}: {len(devices)} local {devices[0].platform} device(s), jax '
      f'{jax.__version__}, CUDA_VISIBLE_DEVICES={os.environ.get("CUDA_VISIBLE_DEVICES")!r}, '
      f'JAX_PLATFORMS={os.environ.get("JAX_PLATFORMS")!r}. '
      f'{fix.format(version=jax.__version__)}.')


def _exit_at_once_on_uncaught_exception() -> None:
  """Makes a crashing process exit without JAX's shutdown barrier.

  At a normal exit JAX waits in a barrier until every process has exited too (up to
  the shutdown timeout, 300 s). After a crash the others are usually blocked in a
  collective waiting for this one, so all would hang until that timeout. Exiting at
  once stops the heartbeats instead, and the survivors are told within
  --heartbeat_timeout_s.
  """
  previous = sys.excepthook

  def excepthook(exc_type, exc, tb):
    previous(exc_type, exc, tb)  # Prints the traceback.
    logging.error('Uncaught %s on process %d: exiting now so the other processes are '
                  'told within the heartbeat timeout.', exc_type.__name__,
                  jax_distributed.global_state.process_id)
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exits.code_for(exc))  # pylint: disable=protected-access

  sys.excepthook = excepthook


def is_lead() -> bool:
  """True on process 0, the one that writes summaries and logs progress."""
  return jax.process_index() == 0


def topology_line(mesh: jax.sharding.Mesh | None = None) -> str:
  """One log line: process i/N, local and global device counts, platform, mesh axes."""
  mesh_text = ('none' if mesh is None else
               '{' + ', '.join(f'{k}: {v}' for k, v in mesh.shape.items()) + '}')
  return (f'process {jax.process_index()}/{jax.process_count()}, '
          f'local devices {jax.local_device_count()}, '
          f'global devices {jax.device_count()} ({jax.default_backend()}), mesh {mesh_text}')


def _absent(client: Any, prefix: str, num_processes: int) -> list[int]:
  arrived = {int(key.rsplit('/', 1)[1]) for key, _ in client.key_value_dir_get(prefix)}
  return sorted(set(range(num_processes)) - arrived)


def barrier(name: str, timeout_s: float | None = None) -> None:
  """Blocks until every process reaches the barrier `name`; no-op with one process.

  A name may be reused (e.g. in a loop): each call is the next round of that name.

  Args:
    name: what the processes wait for, e.g. 'checkpoint_saved'; same on all processes.
    timeout_s: seconds to wait; None = --barrier_timeout_s.

  Raises:
    RuntimeError: the timeout passed (or the runtime failed); the message names the
      processes that had not arrived.
  """
  state = jax_distributed.global_state
  if state.client is None or state.num_processes <= 1:
    return
  if timeout_s is None:
    timeout_s = _flag(_BARRIER_TIMEOUT_S)
  client, pid = state.client, state.process_id
  # The round counter lives in the coordinator's store, not in this module, so repeated
  # barriers of one name get distinct ids without module-level state.
  round_ = client.key_value_increment(f'{_KV_PREFIX}/{name}/rounds/{pid}', 1)
  barrier_id = f'{_KV_PREFIX}/{name}/{round_}'
  # Written before waiting so that, on a timeout, any process can see who arrived.
  client.key_value_set(f'{barrier_id}/arrived/{pid}', '1')
  try:
    client.wait_at_barrier(barrier_id, int(timeout_s * 1000))
  except jax.errors.JaxRuntimeError as e:
    # The runtime's own message runs to several lines; its first line says what failed.
    runtime_said = (str(e).strip() or type(e).__name__).splitlines()[0]
    how = (f'timed out after {timeout_s:g} s' if 'DEADLINE_EXCEEDED' in runtime_said
           else 'failed')
    try:
      absent = _absent(client, f'{barrier_id}/arrived', state.num_processes)
      who = f'process(es) {", ".join(map(str, absent))} had not arrived'
    except jax.errors.JaxRuntimeError:
      who = 'the coordinator is unreachable (process 0 may have died)'
    raise RuntimeError(f"barrier '{name}' {how} on process {pid}: {who}. "
                       f'Runtime said: {runtime_said}') from e


def lead_decides(name: str, mine: str, decide: Callable[[list[str]], str],
                 timeout_s: float | None = None) -> str:
  """Every process offers `mine`; the lead applies `decide` to all offers (in process
  order) and every process returns its decision. One process: `decide([mine])`.

  For choices that must come out the same everywhere although each process sees only
  its own part, e.g. which checkpoint step restores: a step one process cannot read
  must be skipped by all. Through the coordinator's key-value store, not a device
  collective, so a process that failed before offering shows up as a timeout naming it.

  Raises:
    RuntimeError: an offer or the decision did not come within `timeout_s` (None =
      --barrier_timeout_s); the message names the processes that did not offer.
  """
  state = jax_distributed.global_state
  if state.client is None or state.num_processes <= 1:
    return decide([mine])
  if timeout_s is None:
    timeout_s = _flag(_BARRIER_TIMEOUT_S)
  client, pid, count = state.client, state.process_id, state.num_processes
  round_ = client.key_value_increment(f'{_KV_PREFIX}/{name}/rounds/{pid}', 1)
  base = f'{_KV_PREFIX}/{name}/{round_}'
  client.key_value_set(f'{base}/offer/{pid}', mine)
  deadline = time.monotonic() + timeout_s
  try:
    if pid != 0:
      return client.blocking_key_value_get(f'{base}/decision', int(timeout_s * 1000))
    offers = [client.blocking_key_value_get(
        f'{base}/offer/{p}', max(1, int((deadline - time.monotonic()) * 1000)))
              for p in range(count)]
  except jax.errors.JaxRuntimeError as e:
    try:
      absent = _absent(client, f'{base}/offer', count)
      who = (f'process(es) {", ".join(map(str, absent))} made no offer' if absent
             else 'the lead (process 0) decided nothing')
    except jax.errors.JaxRuntimeError:
      who = 'the coordinator is unreachable (process 0 may have died)'
    raise RuntimeError(f"'{name}' was not decided within {timeout_s:g} s on process "
                       f'{pid}: {who}.') from e
  decision = decide(offers)
  client.key_value_set(f'{base}/decision', decision)
  return decision
