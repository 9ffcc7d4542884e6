r"""Kills a training run at random moments and checks that nothing is lost.

    python -m refseg_jax.tools.soak --workdir=/tmp/soak --kills=10 --seed=0 \
        --config=configs/full.py:data=ref_shapes_tiny \
        --config.total_steps=40 --config.checkpoint_every_steps=4 \
        --config.eval.every_steps=8

Every flag it does not define (`--config`, `--config.*`) goes to
`refseg_jax.main` unchanged, and `--config.log_every_steps=1` is added (so
that the step each run reached is in its log). It runs the config twice:

    WORKDIR/uninterrupted/   one run from start to end;
    WORKDIR/killed/          the same run, SIGKILLed `--kills` times and
                             restarted after each kill: once it logged a
                             random step of those left, while a checkpoint
                             is being written (its temporary directory
                             exists), or while it evaluates (it logged
                             'Evaluating step');
    WORKDIR/logs/            each process's output;
    WORKDIR/soak.json        the report.

and checks: the final train states are bit-equal (else the largest
difference is reported); results.json and eval_history.json are equal;
each restart resumed from the latest checkpoint complete at its kill (so
none was lost and no partial one was read) and so lost at most the steps
since it, one checkpoint interval, plus those taken while the next one was
still being written (saves are asynchronous); no temporary file or
directory is left. The exit status is 1 if a check fails.
"""

from __future__ import annotations

import dataclasses
import json
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Sequence

from absl import app
from absl import flags
from absl import logging
from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

FLAGS = flags.FLAGS

KINDS = ('random', 'checkpoint', 'evaluation')
_STEP_LINE = re.compile(r'\] \[(\d+)\] train/')
_RESUMED_LINE = re.compile(r'Resumed from .* at step (\d+)\.')
_EVALUATING = 'Evaluating step'
_TMP_MARK = 'tmp'  # In orbax's temporary directories and results' .tmp files.


@dataclasses.dataclass
class Life:
  """One process of the killed run, as its output and the disk saw it."""
  index: int
  kind: str | None              # The kill it was meant to get; None: none.
  killed: bool = False
  seconds: float = 0.0
  resumed_from: int | None = None   # Its 'Resumed from' line's step.
  reached: int = 0                  # The last step it logged.
  committed_at_exit: int | None = None  # The latest complete checkpoint.
  saving_at_kill: int | None = None     # The checkpoint being written.
  returncode: int | None = None


class _Output:
  """Reads a process's output in a thread: copies it to a log file and
  keeps what the soak watches for."""

  def __init__(self, process: subprocess.Popen, log: epath.Path):
    self.reached, self.resumed_from = 0, None
    self.evaluating = threading.Event()
    self._thread = threading.Thread(target=self._read,
                                    args=(process, log), daemon=True)
    self._thread.start()

  def _read(self, process: subprocess.Popen, log: epath.Path) -> None:
    with log.open('w') as out:
      for line in process.stdout:
        out.write(line)
        if match := _STEP_LINE.search(line):
          self.reached = int(match.group(1))
        elif match := _RESUMED_LINE.search(line):
          self.resumed_from = int(match.group(1))
        elif _EVALUATING in line:
          self.evaluating.set()

  def join(self) -> None:
    self._thread.join()


def committed_steps(workdir: epath.Path) -> list[int]:
  """The complete checkpoints of `workdir` (orbax renames a save into its
  step's directory only once it is complete)."""
  directory = workdir / 'checkpoints'
  if not directory.exists():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _temporary_checkpoints(workdir: epath.Path) -> set[str]:
  """The names of `workdir`'s checkpoints being written, or left half-done
  by a killed process until the next one's checkpoint manager removes them
  (orbax names them after their step only: `<step>.orbax-checkpoint-tmp`).
  """
  directory = workdir / 'checkpoints'
  if not directory.exists():
    return set()
  return {p.name for p in directory.iterdir() if _TMP_MARK in p.name}


def _saving(workdir: epath.Path, stale: set[str]) -> int | None:
  """The step whose checkpoint is being written now, if one is.

  Args:
    workdir: the run's workdir.
    stale: the temporary directories a killed process left that are still
      there; updated: one that is gone is dropped, so that the same name
      made again by this process counts.
  """
  present = _temporary_checkpoints(workdir)
  stale &= present
  for name in sorted(present - stale):
    return int(name.split('.')[0])
  return None


def temporary_paths(workdir: epath.Path) -> list[str]:
  """Every file or directory under `workdir` that a save left half-done."""
  return sorted(str(epath.Path(root) / name)
                for root, dirs, files in workdir.walk()
                for name in dirs + files if _TMP_MARK in name)


def _triggered(kind: str, random_step: int, output: _Output,
               saving: int | None) -> bool:
  if kind == 'random':
    return output.reached >= random_step
  if kind == 'checkpoint':
    return saving is not None
  return output.evaluating.is_set()


def live(command: Sequence[str], workdir: epath.Path, log: epath.Path,
         index: int, kind: str | None, random_step: int,
         timeout: float) -> Life:
  """Runs `command` until it ends, or SIGKILLs it when `kind` happens
  ('random': once its log shows `random_step`, wherever it then is).

  Raises:
    TimeoutError: it neither ended nor was killed within `timeout` s.
  """
  life = Life(index, kind)
  stale = _temporary_checkpoints(workdir)  # Left by the process before.
  start = time.monotonic()
  process = subprocess.Popen(command, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
  output = _Output(process, log)
  while process.poll() is None:
    saving = _saving(workdir, stale)  # Polled, to see stale ones go.
    if kind and _triggered(kind, random_step, output, saving):
      life.saving_at_kill = saving
      process.send_signal(signal.SIGKILL)
      life.killed = True
      break
    if time.monotonic() - start > timeout:
      process.kill()
      raise TimeoutError(f'{" ".join(command)} ran over {timeout} s; its '
                         f'output is in {log}.')
    time.sleep(0.002)
  life.returncode = process.wait()
  output.join()
  life.seconds = time.monotonic() - start
  life.reached, life.resumed_from = output.reached, output.resumed_from
  steps = committed_steps(workdir)
  life.committed_at_exit = steps[-1] if steps else None
  return life


def _restored_state(workdir: epath.Path, step: int) -> Any:
  """The train state of checkpoint `step`, as numpy arrays (on any number
  of devices: the runs may have had several)."""
  path = workdir / 'checkpoints' / str(step) / 'state'
  checkpointer = ocp.PyTreeCheckpointer()
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                          checkpointer.metadata(path).item_metadata.tree)
  return checkpointer.restore(path, restore_args=as_numpy)


def largest_difference(a: Any, b: Any) -> float:
  """The largest |a - b| over two trees of the same structure (inf if the
  structures or shapes differ)."""
  leaves_a, leaves_b = _leaves(a), _leaves(b)
  if leaves_a.keys() != leaves_b.keys():
    return float('inf')
  largest = 0.0
  for key, x in leaves_a.items():
    x, y = np.asarray(x), np.asarray(leaves_b[key])
    if x.shape != y.shape:
      return float('inf')
    if x.size:
      largest = max(largest, float(np.max(np.abs(
          x.astype(np.float64) - y.astype(np.float64)))))
  return largest


def _leaves(tree: Any) -> dict[str, Any]:
  return {jax.tree_util.keystr(path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _bit_equal(a: Any, b: Any) -> bool:
  leaves_a, leaves_b = _leaves(a), _leaves(b)
  return leaves_a.keys() == leaves_b.keys() and all(
      np.array_equal(x, y, equal_nan=np.issubdtype(x.dtype, np.inexact))
      for x, y in ((np.asarray(x), np.asarray(leaves_b[k]))
                   for k, x in leaves_a.items()))


def _json(path: epath.Path) -> Any:
  return json.loads(path.read_text()) if path.exists() else None


def check_lives(lives: Sequence[Life], interval: int) -> list[str]:
  """What went wrong at the restarts, as sentences (none: nothing)."""
  failures = []
  for before, after in zip(lives, lives[1:]):
    if after.resumed_from != before.committed_at_exit:
      failures.append(
          f'Process {after.index} resumed from step {after.resumed_from}; '
          f'the latest complete checkpoint was {before.committed_at_exit}.')
    lost = before.reached - (before.committed_at_exit or 0)
    # Steps taken while the next checkpoint was written are lost with it.
    allowed = interval + (before.reached - before.saving_at_kill
                          if before.saving_at_kill else 0)
    if lost > allowed:
      failures.append(f'Process {before.index} lost {lost} steps (reached '
                      f'{before.reached}, resumed at '
                      f'{before.committed_at_exit}); at most {allowed}.')
  return failures


def compare_runs(uninterrupted: epath.Path, killed: epath.Path
                 ) -> tuple[dict[str, Any], list[str]]:
  """(figures, failures) of the killed run's end against the other's."""
  failures = []
  steps, reference_steps = committed_steps(killed), committed_steps(
      uninterrupted)
  if not steps or steps[-1] != reference_steps[-1]:
    return {}, [f'The killed run ended at checkpoint {steps[-1:]}, the '
                f'uninterrupted one at {reference_steps[-1:]}.']
  state = _restored_state(killed, steps[-1])
  reference = _restored_state(uninterrupted, steps[-1])
  figures = {'final_step': steps[-1],
             'bit_equal': _bit_equal(state, reference),
             'largest_difference': largest_difference(state, reference)}
  if not figures['bit_equal']:
    failures.append('The final train states differ: largest |difference| '
                    f'{figures["largest_difference"]:.3g}.')
  for name in ('results.json', 'eval_history.json'):
    expected = _json(uninterrupted / name)
    figures[f'same_{name}'] = (expected is not None
                               and _json(killed / name) == expected)
    if not figures[f'same_{name}']:
      failures.append(f'{killed / name} differs from (or lacks) '
                      f'{uninterrupted / name}.')
  leftovers = temporary_paths(killed)
  figures['temporary_paths_left'] = leftovers
  if leftovers:
    failures.append(f'Left behind: {leftovers}.')
  return figures, failures


def soak(main_args: Sequence[str], workdir: epath.Path, kills: int,
         seed: int, timeout: float) -> tuple[dict[str, Any], list[str]]:
  """Runs the soak (module doc); returns (report, failures)."""
  rng = np.random.default_rng(seed)
  kinds = [KINDS[i % len(KINDS)] for i in range(kills)]
  rng.shuffle(kinds)
  (workdir / 'logs').mkdir(parents=True, exist_ok=True)

  def command(run: str) -> list[str]:
    return [sys.executable, '-m', 'refseg_jax.main', *main_args,
            f'--workdir={workdir / run}', '--config.log_every_steps=1']

  reference = live(command('uninterrupted'), workdir / 'uninterrupted',
                   workdir / 'logs' / 'uninterrupted.log', 0, None, 0,
                   timeout)
  if reference.returncode != 0:
    raise RuntimeError(f'The uninterrupted run failed; see '
                       f'{workdir / "logs" / "uninterrupted.log"}.')
  config = json.loads((workdir / 'uninterrupted' / 'config.json').read_text())
  total, interval = config['total_steps'], config['checkpoint_every_steps']
  lives = []
  for index, kind in enumerate([*kinds, None], start=1):
    done = (lives[-1].committed_at_exit or 0) if lives else 0
    # A step of what is left (not the last: the run could end first).
    random_step = int(rng.integers(done + 1, max(done + 2, total)))
    life = live(command('killed'), workdir / 'killed',
                workdir / 'logs' / f'killed_{index}.log', index, kind,
                random_step, timeout)
    lives.append(life)
    logging.info('Process %d (%s): %s at step %d after %.1f s; resumed from '
                 '%s, latest complete checkpoint %s.', index, kind,
                 'killed' if life.killed else f'exited {life.returncode}',
                 life.reached, life.seconds, life.resumed_from,
                 life.committed_at_exit)
    if not life.killed:
      break
  failures = check_lives(lives, interval)
  if lives[-1].killed or lives[-1].returncode != 0:
    failures.append(f'The last process did not finish cleanly; see '
                    f'{workdir / "logs" / f"killed_{lives[-1].index}.log"}.')
  figures, more = compare_runs(workdir / 'uninterrupted', workdir / 'killed')
  failures += more
  delivered = sum(life.killed for life in lives)
  if delivered < kills:
    failures.append(f'Only {delivered} of {kills} kills happened before the '
                    'run ended: give it more steps.')
  report = {'kills_requested': kills, 'kills_delivered': delivered,
            'seed': seed, 'total_steps': total,
            'checkpoint_every_steps': interval,
            'uninterrupted_seconds': reference.seconds,
            'max_steps_lost': max((life.reached - (life.committed_at_exit or 0)
                                   for life in lives if life.killed),
                                  default=0),
            **figures, 'processes': [dataclasses.asdict(l) for l in lives],
            'failures': failures}
  return report, failures


def main(argv: Sequence[str]) -> None:
  main_args = argv[1:]  # What this command's flags left: refseg_jax.main's.
  workdir = epath.Path(FLAGS.workdir)
  if workdir.exists() and any(workdir.iterdir()):
    raise app.UsageError(f'--workdir={workdir} is not empty; the soak '
                         'needs fresh runs.')
  report, failures = soak(main_args, workdir, FLAGS.kills, FLAGS.seed,
                          FLAGS.timeout)
  (workdir / 'soak.json').write_text(json.dumps(report, indent=2))
  print(f'soak: {report["kills_delivered"]} kills '
        f'({", ".join(l["kind"] for l in report["processes"] if l["killed"])}),'
        f' final state bit-equal: {report.get("bit_equal")}, largest '
        f'difference {report.get("largest_difference")}, max steps lost '
        f'{report["max_steps_lost"]} (interval '
        f'{report["checkpoint_every_steps"]}); '
        f'{"FAILED: " + " ".join(failures) if failures else "all checks pass"}'
        f' ({workdir / "soak.json"})')
  if failures:
    sys.exit(1)


if __name__ == '__main__':
  # Flags are defined only when run as a program (every command does so),
  # so that importing this module defines no flag.
  flags.DEFINE_string('workdir', None, 'Output directory (must be empty).',
                      required=True)
  flags.DEFINE_integer('kills', 3, 'SIGKILLs to send.')
  flags.DEFINE_integer('seed', 0, 'Seed of the kill kinds and moments.')
  flags.DEFINE_float('timeout', 1800, 'Seconds one process may run.')
  # Flags not defined here are refseg_jax.main's: left in argv for it.
  app.run(main, flags_parser=lambda argv: flags.FLAGS(argv, known_only=True))
