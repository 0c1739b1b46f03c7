"""What a run left in its workdir, read back the same way by every end-to-end test:
its metrics records and losses, its committed checkpoint steps, its final state."""

import json
import os

import numpy as np
import orbax.checkpoint as ocp


def records(workdir) -> list[dict]:
  """metrics.jsonl's records in order ([] before the first write)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]


def losses(workdir, key='train/loss') -> dict[int, float]:
  """step -> `key` at full precision; a step logged twice (redone after a restore) keeps
  its last value."""
  return {r['step']: r[key] for r in records(workdir) if key in r}


def committed_steps(workdir) -> list[int]:
  manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'),
                                  item_names=('state', 'data', 'meta'),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  return sorted(manager.all_steps())


def final_state(workdir):
  """The newest checkpoint's step and train state as numpy arrays.

  Read onto no devices: restoring as saved would need the run's topology (a checkpoint
  of 4 processes x 2 devices names devices this test process does not have).
  """
  steps = committed_steps(workdir)
  assert steps, f'no committed checkpoint in {workdir}'
  path = os.path.join(workdir, 'checkpoints', str(steps[-1]), 'state')
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  import jax  # pylint: disable=import-outside-toplevel
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return steps[-1], checkpointer.restore(path, restore_args=as_numpy)


def assert_same_arrays(a, b) -> None:
  """Every leaf of `a` equals `b`'s bit for bit."""
  import jax  # pylint: disable=import-outside-toplevel
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b) > 0
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
