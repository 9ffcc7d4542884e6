r"""Trains on a Cloud TPU VM pod slice: create it, copy the repository to
every worker, install, start the same command on all workers, follow the
log, stop (checkpoint) and delete. Standard library only, so it runs from a
checkout without installing anything:

    python launch/tpu_pod.py [--dry-run] COMMAND --name=NAME --zone=ZONE \
        [--project=PROJECT] [options]

    create  --accelerator=v4-32 [--version=tpu-ubuntu2204-base] [--spot]
            [--queued]
    setup   [--python=3.11]
    run     --config=configs/full.py[:ARG] --workdir=gs://BUCKET/run \
            [--data_dir=gs://BUCKET/tfds] [-- FLAGS for refseg_jax.main...]
    logs    [--worker=0] [--follow] [--lines=100]
    stop
    delete  [--queued]

`--dry-run` prints every command it would run (local ones such as the tar
too), one per line as a shell would read it, and runs nothing; notes are
`# ` lines. Without it each command is echoed (`+ ...`) and run; the first
failure stops the launcher with its exit status.

How a run is laid out (docs/launch.md):
  * setup: the repository's tracked and untracked-but-not-ignored files
    (`git ls-files -co --exclude-standard`: no .git, no .venv) are packed,
    copied to every worker and unpacked into ~/refseg_jax (replacing it);
    ~/refseg_venv is made once, with uv's Python 3.11 (the runtime's Ubuntu
    22.04 has 3.10; jax 0.10 needs 3.11), and `pip install -e '.[tpu]'`.
  * run: every worker starts `python -m refseg_jax.main --distributed ...`
    at once, detached (setsid nohup, stdin /dev/null), appending to
    ~/refseg_run.log and recording its pid in ~/refseg_run.pid; the ssh
    returns at once. The hosts find each other through JAX's Cloud TPU
    auto-detection. Workdir and TFDS data dir must be shared by every host:
    gs:// (or, with --shared_fs, a filesystem mounted on every worker).
  * stop: SIGTERM to each worker's training; JAX's preemption service makes
    the hosts agree on a step, which the training saves before it exits.
    `run` again with the same flags resumes from it.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from typing import List, Optional, Sequence, Union

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A runtime with Ubuntu and no framework, for JAX on v4 (what big_vision's
# README creates); `gcloud compute tpus tpu-vm versions list --zone=ZONE`
# lists the others (docs/launch.md).
DEFAULT_VERSION = 'tpu-ubuntu2204-base'
DEFAULT_PYTHON = '3.11'  # docs/versions.md: the tested Python.

# On each worker, relative to its home directory.
REMOTE_DIR = 'refseg_jax'
REMOTE_VENV = 'refseg_venv'
REMOTE_TARBALL = 'refseg_jax.tar.gz'
REMOTE_LOG = 'refseg_run.log'
REMOTE_PID = 'refseg_run.pid'

# A step is one command (argv) or a pipeline (a list of argvs).
Command = List[str]
Step = Union[Command, List[Command]]


class LaunchError(Exception):
  """A request the launcher refuses, with the reason for the user."""


def expected_hosts(accelerator: str) -> Optional[int]:
  """TPU VM hosts (workers) of `accelerator`, where the rule is certain.

  v2-N, v3-N, v4-N and v5p-N count TensorCores: 2 a chip, 4 chips (8
  TensorCores) a host, so N // 8 hosts (v4-32: 16 chips, 4 hosts).

  Args:
    accelerator: a `--accelerator-type`, e.g. 'v4-32'.

  Returns:
    The host count, or None for other types (v5e, v6e, ...: chips, with
    hosts of 1, 4 or 8 chips).
  """
  match = re.fullmatch(r'v(?:2|3|4|5p)-(\d+)', accelerator)
  if not match:
    return None
  cores = int(match.group(1))
  if cores < 8 or cores % 8:
    return None
  return cores // 8


def _scope(args: argparse.Namespace) -> Command:
  """The zone (and project) flags every gcloud command takes."""
  flags = [f'--zone={args.zone}']
  if args.project:
    flags.append(f'--project={args.project}')
  return flags


def _ssh(args: argparse.Namespace, script: str, worker: str = 'all') -> Command:
  """`gcloud ... tpu-vm ssh` running `script` (bash) on `worker`."""
  return (['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', args.name] +
          _scope(args) + [f'--worker={worker}', f'--command={script}'])


def _local_repo() -> str:
  """The repository as a path for the local commands: relative to the
  current directory when under it (readable output), else absolute."""
  rel = os.path.relpath(REPO)
  return REPO if rel.startswith('..') else rel


def tarball_path(name: str) -> str:
  """Where `setup` packs the repository on this machine."""
  return os.path.join(tempfile.gettempdir(), f'refseg_jax-{name}.tar.gz')


def create_commands(args: argparse.Namespace) -> List[Step]:
  """Creates the TPU VM slice, or queues its request (--queued)."""
  if args.queued:
    # The queued resource and its one node share the name, so the other
    # commands address the node as any TPU VM.
    command = (['gcloud', 'compute', 'tpus', 'queued-resources', 'create',
                args.name, f'--node-id={args.name}'] + _scope(args) +
               [f'--accelerator-type={args.accelerator}',
                f'--runtime-version={args.version}'])
  else:
    command = (['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', args.name] +
               _scope(args) + [f'--accelerator-type={args.accelerator}',
                               f'--version={args.version}'])
  if args.spot:
    command.append('--spot')
  return [command]


def create_notes(args: argparse.Namespace) -> List[str]:
  """The host count of the accelerator, and how to wait for a queued one."""
  hosts = expected_hosts(args.accelerator)
  if hosts is None:
    notes = [f'{args.accelerator}: host count unknown to this launcher '
             f'(`gcloud compute tpus tpu-vm describe {args.name}` lists the '
             'workers once it exists).']
  else:
    workers = ('1 worker (host 0)' if hosts == 1 else
               f'{hosts} workers (hosts 0-{hosts - 1})')
    notes = [f'{args.accelerator}: {workers}; setup, run and stop act on '
             'all of them.']
  if args.queued:
    notes.append('Queued: the TPU VM exists once `gcloud compute tpus '
                 f'queued-resources describe {args.name} '
                 f'{shlex.join(_scope(args))}` says state ACTIVE.')
  return notes


def _running_test() -> str:
  """Bash test: this worker's recorded training process is alive."""
  return (f'[ -f ~/{REMOTE_PID} ] && grep -qs refseg_jax.main '
          f'/proc/"$(cat ~/{REMOTE_PID})"/cmdline')


def setup_script(python: str = DEFAULT_PYTHON) -> str:
  """The bash run on every worker by `setup`: unpack, venv, install
  (refused while a run is going: it would replace the code under it)."""
  return '; '.join([
      f'if {_running_test()}; then echo "$(hostname): a run is going; stop '
      'it first" >&2; exit 1; fi',
      'set -e',
      f'rm -rf ~/{REMOTE_DIR}',
      f'mkdir -p ~/{REMOTE_DIR}',
      f'tar -xzf ~/{REMOTE_TARBALL} -C ~/{REMOTE_DIR}',
      f'rm ~/{REMOTE_TARBALL}',
      # uv brings its own Python where the image's is older.
      f'if [ ! -x ~/{REMOTE_VENV}/bin/python ]; then '
      'if [ ! -x ~/.local/bin/uv ]; then curl -LsSf '
      'https://astral.sh/uv/install.sh | env UV_NO_MODIFY_PATH=1 sh; fi; '
      f'~/.local/bin/uv venv --seed --python {shlex.quote(python)} '
      f'~/{REMOTE_VENV}; fi',
      f'cd ~/{REMOTE_DIR}',
      f"~/{REMOTE_VENV}/bin/pip install --quiet -e '.[tpu]'",
      f'echo "$(hostname): installed in ~/{REMOTE_VENV}"',
  ])


def setup_commands(args: argparse.Namespace) -> List[Step]:
  """Packs the repository, copies it to every worker, installs it."""
  repo, tarball = _local_repo(), tarball_path(args.name)
  pack = [['git', '-C', repo, 'ls-files', '-z', '--cached', '--others',
           '--exclude-standard'],
          ['tar', '-C', repo, '--null', '--files-from=-', '-czf', tarball]]
  copy = (['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', tarball,
           f'{args.name}:{REMOTE_TARBALL}'] + _scope(args) +
          ['--worker=all'])
  return [pack, copy, _ssh(args, setup_script(args.python))]


def train_argv(config: str, workdir: str, data_dir: Optional[str],
               extra_flags: Sequence[str]) -> Command:
  """The training command every worker runs (in ~/refseg_jax)."""
  argv = [f'~/{REMOTE_VENV}/bin/python', '-m', 'refseg_jax.main',
          '--distributed', f'--config={config}', f'--workdir={workdir}']
  if data_dir:
    argv.append(f'--config.data.data_dir={data_dir}')
  return argv + list(extra_flags)


def run_script(train: Command) -> str:
  """The bash run on every worker by `run`: start `train` detached.

  The process outlives the ssh session (setsid: its own session, no
  SIGHUP; stdin from /dev/null, output appended to ~/refseg_run.log) and
  records its pid (bash writes $$, then execs python in that process). A
  worker whose previous run is still alive refuses to start another.
  """
  # The python path's `~` must stay unquoted to expand.
  python, rest = train[0], train[1:]
  inner = (f'echo $$ > ~/{REMOTE_PID}; exec {python} {shlex.join(rest)}')
  return (
      f'cd ~/{REMOTE_DIR}; '
      f'if {_running_test()}; then echo "$(hostname): a run is going '
      f'(pid $(cat ~/{REMOTE_PID})); stop it first" >&2; exit 1; fi; '
      f'setsid nohup bash -c {shlex.quote(inner)} >> ~/{REMOTE_LOG} 2>&1 '
      '< /dev/null & '
      f'echo "$(hostname): started; log ~/{REMOTE_LOG}"')


def _shared(path: str) -> bool:
  return path.startswith('gs://')


def run_commands(args: argparse.Namespace) -> List[Step]:
  """Starts the training on every worker at once, detached.

  Raises:
    LaunchError: the workdir or data dir is not on gs:// (every host must
      see the same files) and --shared_fs was not given.
  """
  for flag, path in (('--workdir', args.workdir),
                     ('--data_dir', args.data_dir)):
    if path and not _shared(path) and not args.shared_fs:
      raise LaunchError(
          f'{flag}={path} is not on gs://: every host of the pod reads and '
          'writes it, so it must be a bucket (or, with --shared_fs, a '
          'filesystem mounted at that path on every worker).')
  train = train_argv(args.config, args.workdir, args.data_dir,
                     args.extra_flags)
  return [_ssh(args, run_script(train))]


def run_notes(args: argparse.Namespace) -> List[str]:
  """Where the log is, and the data dir a run without --data_dir reads."""
  notes = []
  if not args.data_dir and not any(
      flag.startswith('--config.data.data_dir') for flag in args.extra_flags):
    notes.append('No --data_dir: each worker uses the config\'s data dir '
                 '(TFDS default ~/tensorflow_datasets, not shared); a '
                 'dataset process 0 builds there is not seen by the others.')
  scope = shlex.join([f'--name={args.name}'] + _scope(args))
  notes.append(f'Follow: python launch/tpu_pod.py logs {scope} --follow')
  return notes


def logs_commands(args: argparse.Namespace) -> List[Step]:
  """Prints (or follows) the end of one worker's log."""
  tail = f'tail -n {int(args.lines)}' + (' -F' if args.follow else '')
  return [_ssh(args, f'{tail} ~/{REMOTE_LOG}', worker=str(args.worker))]


def stop_script() -> str:
  """The bash run on every worker by `stop`: SIGTERM to its training."""
  return (f'if {_running_test()}; then kill -TERM "$(cat ~/{REMOTE_PID})" '
          f'&& echo "$(hostname): SIGTERM sent to pid $(cat ~/{REMOTE_PID})'
          '; it saves a checkpoint and exits"; else echo "$(hostname): no '
          'training running"; fi')


def stop_commands(args: argparse.Namespace) -> List[Step]:
  """SIGTERM to the training on every worker (it checkpoints and exits)."""
  return [_ssh(args, stop_script())]


def delete_commands(args: argparse.Namespace) -> List[Step]:
  """Deletes the TPU VM, or the queued resource and its node (--queued)."""
  if args.queued:
    return [['gcloud', 'compute', 'tpus', 'queued-resources', 'delete',
             args.name] + _scope(args) + ['--force', '--quiet']]
  return [['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', args.name] +
          _scope(args) + ['--quiet']]


COMMANDS = {
    'create': (create_commands, create_notes),
    'setup': (setup_commands, None),
    'run': (run_commands, run_notes),
    'logs': (logs_commands, None),
    'stop': (stop_commands, None),
    'delete': (delete_commands, None),
}


def format_step(step: Step) -> str:
  """`step` as one shell line."""
  if step and isinstance(step[0], list):
    return ' | '.join(shlex.join(command) for command in step)
  return shlex.join(step)


def execute(step: Step) -> int:
  """Runs `step` (a pipeline without a shell); its exit status."""
  if not (step and isinstance(step[0], list)):
    return subprocess.run(step, check=False).returncode
  processes, stdin = [], None
  for i, command in enumerate(step):
    last = i == len(step) - 1
    process = subprocess.Popen(command, stdin=stdin,
                               stdout=None if last else subprocess.PIPE)
    if stdin is not None:
      stdin.close()  # The next command holds it now.
    stdin = process.stdout
    processes.append(process)
  statuses = [process.wait() for process in processes]
  return next((status for status in statuses if status), 0)


def build_parser() -> argparse.ArgumentParser:
  """The command line (module docstring)."""
  parser = argparse.ArgumentParser(
      prog='launch/tpu_pod.py',
      description=__doc__.split('\n\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog='Full description: the module docstring and docs/launch.md.')
  parser.add_argument('--dry-run', action='store_true',
                      help='Print the commands; run nothing.')
  common = argparse.ArgumentParser(add_help=False)
  # Also accepted after the command; SUPPRESS keeps a global one.
  common.add_argument('--dry-run', action='store_true',
                      default=argparse.SUPPRESS, help=argparse.SUPPRESS)
  common.add_argument('--name', required=True, help='TPU VM (node) name.')
  common.add_argument('--zone', required=True, help='e.g. us-central2-b.')
  common.add_argument('--project', help='Default: gcloud\'s core/project.')
  commands = parser.add_subparsers(dest='command', required=True)

  create = commands.add_parser('create', parents=[common],
                               help=create_commands.__doc__)
  create.add_argument('--accelerator', required=True,
                      help='--accelerator-type, e.g. v4-32.')
  create.add_argument('--version', default=DEFAULT_VERSION,
                      help='TPU runtime (software) version; default '
                      '%(default)s.')
  create.add_argument('--spot', action='store_true',
                      help='Spot capacity (preemptible; run again resumes).')
  create.add_argument('--queued', action='store_true',
                      help='Request it as a queued resource.')

  setup = commands.add_parser('setup', parents=[common],
                              help=setup_commands.__doc__)
  setup.add_argument('--python', default=DEFAULT_PYTHON,
                     help='Python of the workers\' venv (uv fetches it); '
                     'default %(default)s.')

  run = commands.add_parser('run', parents=[common], help=run_commands.__doc__,
                            usage='%(prog)s [options] [-- MAIN_FLAGS...]')
  run.add_argument('--config', required=True,
                   help='e.g. configs/full.py:model=r101 (repository path).')
  run.add_argument('--workdir', required=True, help='gs://BUCKET/DIR.')
  run.add_argument('--data_dir',
                   help='TFDS data dir, gs://BUCKET/DIR: '
                   '--config.data.data_dir.')
  run.add_argument('--shared_fs', action='store_true',
                   help='Allow a workdir/data dir outside gs:// (a '
                   'filesystem mounted at that path on every worker).')

  logs = commands.add_parser('logs', parents=[common],
                             help=logs_commands.__doc__)
  logs.add_argument('--worker', type=int, default=0, help='Default 0.')
  logs.add_argument('--follow', action='store_true', help='tail -F.')
  logs.add_argument('--lines', type=int, default=100, help='Default 100.')

  commands.add_parser('stop', parents=[common], help=stop_commands.__doc__)
  delete = commands.add_parser('delete', parents=[common],
                               help=delete_commands.__doc__)
  delete.add_argument('--queued', action='store_true',
                      help='It was created with --queued.')
  return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  """Parses `argv` (no program name); flags after `--` go to `run`."""
  argv = list(argv)
  extra = []
  if '--' in argv:
    split = argv.index('--')
    argv, extra = argv[:split], argv[split + 1:]
  parser = build_parser()
  args = parser.parse_args(argv)
  if extra and args.command != 'run':
    parser.error(f'flags after -- are for `run` only, not {args.command}')
  args.extra_flags = extra
  return args


def main(argv: Sequence[str]) -> int:
  """Runs (or, with --dry-run, prints) a command's steps; exit status."""
  args = parse_args(argv)
  make_steps, make_notes = COMMANDS[args.command]
  try:
    steps = make_steps(args)
  except LaunchError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  notes = make_notes(args) if make_notes else []
  if args.dry_run:
    for step in steps:
      print(format_step(step))
    for note in notes:
      print(f'# {note}')
    return 0
  if shutil.which('gcloud') is None:
    print('error: gcloud is not on PATH. Install the Google Cloud CLI '
          '(https://cloud.google.com/sdk/docs/install) and log in, or '
          'see the commands with --dry-run.', file=sys.stderr)
    return 2
  for step in steps:
    print(f'+ {format_step(step)}', flush=True)
    status = execute(step)
    if status:
      print(f'error: exit status {status}: {format_step(step)}',
            file=sys.stderr)
      return status
  for note in notes:
    print(f'# {note}')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
