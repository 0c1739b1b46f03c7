"""SLURM's own time-limit signal, end to end: run by hand, too long for the suite.

  .venv/bin/python -m pytest -q -s tests/slurm_time_limit.py    # about 6 minutes

(The file name does not match test_*.py, so `make test` leaves it out; the suite covers
the same batch-shell path with `scancel --batch --signal=USR1` in tests/test_slurm.py.)

A job submitted with --time and --signal-before gets B:USR1 from slurmctld itself. SLURM
checks time limits on a fixed 30 s cycle and sends the signal up to 30 s before it is
due, so a fixed --time would land the signal anywhere in a 30 s window, and the requeued
job, with the same limit, would be signalled again. Instead, once training is under way
the test shortens the job's limit so that the signal is due at slurmctld's next check
(remaining time < --signal-before + 30 s) while the limit itself is still 80-140 s
away; once the batch shell has been signalled it restores the long limit, so the
resumed job runs to the end.
"""

import math
import re
import subprocess
import time

# The fixtures and helpers of the suite's SLURM tests (pytest finds fixtures by name).
from test_slurm import assert_same_arrays
from test_slurm import assert_stopped_once_and_resumed
from test_slurm import cancel_leftover_jobs  # pylint: disable=unused-import
from test_slurm import final_state
from test_slurm import flags_for
from test_slurm import job_fields
from test_slurm import jsonl_losses
from test_slurm import read
from test_slurm import slurm_env  # pylint: disable=unused-import
from test_slurm import stop_events
from test_slurm import submit
from test_slurm import Timeline
from test_slurm import wait_for_step
from test_slurm import wait_until_ended

# Enough steps that 30 s of slurmctld's cycle plus the stop cannot reach the end.
NUM_STEPS = 600
SIGNAL_BEFORE_S = 120
LONG_LIMIT = '00:10:00'


def _seconds(hms):
  """SLURM's [D-]HH:MM:SS as seconds."""
  days, _, hms = hms.rpartition('-')
  h, m, s = (int(x) for x in hms.split(':'))
  return int(days or 0) * 86400 + h * 3600 + m * 60 + s


def _set_limit(env, job_id, limit):
  subprocess.run(['scontrol', 'update', f'JobId={job_id}', f'TimeLimit={limit}'], env=env,
                 check=True, timeout=30)


def test_time_limit_signal_saves_requeues_and_resumes(slurm_env, tmp_path):
  flags = flags_for(NUM_STEPS)
  (tmp_path / 'ref').mkdir()
  (tmp_path / 'timed').mkdir()
  ref_id, ref_dir, ref_log = submit(slurm_env, tmp_path / 'ref', flags=flags)
  fields = wait_until_ended(slurm_env, ref_id, ref_log, timeout_s=900)
  assert fields['JobState'] == 'COMPLETED', read(ref_log)[-3000:]

  job_id, workdir, log = submit(slurm_env, tmp_path / 'timed', '--time', LONG_LIMIT,
                                '--signal-before', str(SIGNAL_BEFORE_S), flags=flags)
  signal_after = 10
  wait_for_step(slurm_env, job_id, workdir, log, signal_after)
  elapsed = _seconds(job_fields(slurm_env, job_id)['RunTime'])
  minutes = math.ceil((elapsed + 80) / 60)  # TimeLimit is whole minutes.
  _set_limit(slurm_env, job_id, minutes)
  limit_at = time.time() + minutes * 60 - elapsed
  timeline = Timeline(log, stop_events(workdir))
  restored = []

  def poll():
    timeline.poll()
    if 'batch shell asks the tasks to save' in timeline.seen and not restored:
      _set_limit(slurm_env, job_id, LONG_LIMIT)  # For the requeued job.
      restored.append(time.time())

  fields = wait_until_ended(slurm_env, job_id, log, timeout_s=900, on_poll=poll)
  timeline.poll()
  text = read(log)
  signalled = timeline.seen['batch shell asks the tasks to save']
  print(f'time-limit job: limit set to {minutes} min at {elapsed} s of run time '
        f'({minutes * 60 - elapsed} s left); seconds after that: {timeline}; the signal came '
        f'{limit_at - timeline.t0 - signalled:.1f} s before the limit')
  step = assert_stopped_once_and_resumed(fields, text, timeline, NUM_STEPS, signal_after)
  assert re.search(r'time limit near: asking the tasks to save', text)
  print(f'stopped at step {step} of {NUM_STEPS}')
  final_step, state = final_state(workdir)
  ref_step, ref_state = final_state(ref_dir)
  assert final_step == ref_step == NUM_STEPS
  assert_same_arrays(state, ref_state)
  assert jsonl_losses(workdir) == jsonl_losses(ref_dir)
