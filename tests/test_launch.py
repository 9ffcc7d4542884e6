"""The launchers: launch/tpu_pod.py's commands and launch/slurm.sbatch.

Neither gcloud nor SLURM runs here. The TPU launcher's `--dry-run` output
is checked line by line with no gcloud on PATH (and tripwires in place of
git and tar, so that nothing runs); the scripts it sends to the workers are
run in a fake home directory (a fake venv python that records its argv and
waits for SIGTERM); its real mode runs against a fake gcloud that records
its calls. The SLURM script runs with a fake `srun`, and JAX's own SLURM
detection is called with the environment SLURM gives a task.
"""

import importlib.util
import json
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import tarfile
import time

from jax._src import clusters
from jax._src.clusters import cluster as cluster_lib
import pytest

REPO = pathlib.Path(__file__).parents[1]
LAUNCHER = REPO / 'launch' / 'tpu_pod.py'
SBATCH = REPO / 'launch' / 'slurm.sbatch'
POD = ['--name=refseg-pod', '--zone=us-central2-b']
TRAIN = ['--config=configs/full.py:model=r101', '--workdir=gs://bucket/run',
         '--data_dir=gs://bucket/tfds']
# A flag a shell would split, expand or run if it were not quoted.
NASTY = '--config.data.tokenizer=my vocab;$(touch pwned) `touch pwned`'


def _load_launcher():
  spec = importlib.util.spec_from_file_location('tpu_pod', LAUNCHER)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


tpu_pod = _load_launcher()


def _write_script(path: pathlib.Path, text: str) -> pathlib.Path:
  path.write_text(text)
  path.chmod(0o755)
  return path


@pytest.fixture
def bin_dir(tmp_path):
  """A PATH without gcloud: `git` and `tar` tripwires that log their use."""
  directory = tmp_path / 'bin'
  directory.mkdir()
  for name in ('git', 'tar'):
    _write_script(directory / name,
                  f'#!/bin/sh\necho {name} >> "{tmp_path}/executed"\n')
  return directory


def _launch(args, path, tmp_path, cwd=REPO, launcher=LAUNCHER):
  """Runs the launcher with `path` as PATH; its CompletedProcess."""
  env = dict(os.environ, PATH=str(path), TMPDIR=str(tmp_path))
  return subprocess.run([sys.executable, str(launcher)] + list(args),
                        capture_output=True, text=True, cwd=cwd, env=env,
                        timeout=60, check=False)


def _dry_run(args, bin_dir, tmp_path):
  """The commands `--dry-run` prints, and its notes (without '# ')."""
  done = _launch(['--dry-run'] + list(args), bin_dir, tmp_path)
  assert done.returncode == 0, done.stderr
  assert not (tmp_path / 'executed').exists()  # The tripwires.
  lines = done.stdout.splitlines()
  commands = [line for line in lines if not line.startswith('# ')]
  notes = [line[2:] for line in lines if line.startswith('# ')]
  return commands, notes


def _remote_script(line: str) -> str:
  """The bash script a printed `gcloud ... ssh` line runs on the workers."""
  words = shlex.split(line)
  assert words[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh']
  (script,) = [w[len('--command='):] for w in words
               if w.startswith('--command=')]
  return script


def test_expected_hosts():
  # v2-v4 and v5p count TensorCores: 2 a chip, 4 chips a host.
  assert tpu_pod.expected_hosts('v4-8') == 1
  assert tpu_pod.expected_hosts('v4-32') == 4
  assert tpu_pod.expected_hosts('v5p-16') == 2
  assert tpu_pod.expected_hosts('v3-32') == 4
  assert tpu_pod.expected_hosts('v2-8') == 1
  for unknown in ('v5litepod-16', 'v6e-8', 'v4-12', 'tpu7x-8'):
    assert tpu_pod.expected_hosts(unknown) is None


def test_dry_run_create(bin_dir, tmp_path):
  commands, notes = _dry_run(
      ['create'] + POD + ['--project=my-project', '--accelerator=v4-32'],
      bin_dir, tmp_path)
  assert commands == [
      'gcloud compute tpus tpu-vm create refseg-pod --zone=us-central2-b '
      '--project=my-project --accelerator-type=v4-32 '
      '--version=tpu-ubuntu2204-base']
  assert notes == ['v4-32: 4 workers (hosts 0-3); setup, run and stop act '
                   'on all of them.']


def test_dry_run_create_queued_spot(bin_dir, tmp_path):
  commands, notes = _dry_run(
      ['create'] + POD + ['--accelerator=v4-32', '--queued', '--spot',
                          '--version=v2-alpha-tpuv4'], bin_dir, tmp_path)
  assert commands == [
      'gcloud compute tpus queued-resources create refseg-pod '
      '--node-id=refseg-pod --zone=us-central2-b --accelerator-type=v4-32 '
      '--runtime-version=v2-alpha-tpuv4 --spot']
  assert notes[0].startswith('v4-32: 4 workers (hosts 0-3)')
  assert 'queued-resources describe refseg-pod' in notes[1]
  _, notes = _dry_run(['create'] + POD + ['--accelerator=v6e-16'], bin_dir,
                      tmp_path)
  assert 'host count unknown' in notes[0]


def test_dry_run_setup(bin_dir, tmp_path):
  commands, _ = _dry_run(['setup'] + POD, bin_dir, tmp_path)
  tarball = tmp_path / 'refseg_jax-refseg-pod.tar.gz'
  assert commands[:2] == [
      'git -C . ls-files -z --cached --others --exclude-standard | '
      f'tar -C . --null --files-from=- -czf {tarball}',
      f'gcloud compute tpus tpu-vm scp {tarball} '
      'refseg-pod:refseg_jax.tar.gz --zone=us-central2-b --worker=all']
  assert len(commands) == 3
  assert '--worker=all' in shlex.split(commands[2])
  script = _remote_script(commands[2])
  assert 'tar -xzf ~/refseg_jax.tar.gz -C ~/refseg_jax' in script
  assert 'uv venv --seed --python 3.11 ~/refseg_venv' in script
  assert "cd ~/refseg_jax; ~/refseg_venv/bin/pip install --quiet -e '.[tpu]'" \
      in script


def test_dry_run_logs_stop_delete(bin_dir, tmp_path):
  (logs,), _ = _dry_run(['logs'] + POD + ['--worker=2', '--follow'], bin_dir,
                        tmp_path)
  assert shlex.split(logs) == [
      'gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'refseg-pod',
      '--zone=us-central2-b', '--worker=2',
      '--command=tail -n 100 -F ~/refseg_run.log']
  (stop,), _ = _dry_run(['stop'] + POD, bin_dir, tmp_path)
  assert '--worker=all' in shlex.split(stop)
  assert 'kill -TERM "$(cat ~/refseg_run.pid)"' in _remote_script(stop)
  delete, _ = _dry_run(['delete'] + POD, bin_dir, tmp_path)
  assert delete == ['gcloud compute tpus tpu-vm delete refseg-pod '
                    '--zone=us-central2-b --quiet']
  delete, _ = _dry_run(['delete', '--queued'] + POD, bin_dir, tmp_path)
  assert delete == ['gcloud compute tpus queued-resources delete refseg-pod '
                    '--zone=us-central2-b --force --quiet']


def test_dry_run_run(bin_dir, tmp_path):
  # --dry-run is accepted after the command too.
  (line,), notes = _dry_run(
      ['run', '--dry-run'] + POD + TRAIN +
      ['--', '--config.total_steps=100', NASTY], bin_dir, tmp_path)
  words = shlex.split(line)
  assert words[:8] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh',
                       'refseg-pod', '--zone=us-central2-b', '--worker=all']
  assert len(words) == 9 and words[8].startswith('--command=')
  script = _remote_script(line)
  assert 'setsid nohup bash -c ' in script
  assert '>> ~/refseg_run.log 2>&1 < /dev/null & ' in script
  assert 'exec ~/refseg_venv/bin/python -m refseg_jax.main --distributed' \
      in script
  assert notes == ['Follow: python launch/tpu_pod.py logs --name=refseg-pod '
                   '--zone=us-central2-b --follow']


def _fake_home(tmp_path) -> pathlib.Path:
  """A worker's home after setup, whose venv python records its argv and
  working directory, then waits for SIGTERM (as the training does)."""
  home = tmp_path / 'home'
  (home / 'refseg_jax').mkdir(parents=True)
  (home / 'refseg_venv' / 'bin').mkdir(parents=True)
  _write_script(home / 'refseg_venv' / 'bin' / 'python', '''#!/bin/bash
sleep 20 &
trap 'kill $!; echo TERM > "$HOME/term"; exit 0' TERM
printf '%s\\0' "$@" > "$HOME/argv.tmp"
pwd > "$HOME/cwd"
mv "$HOME/argv.tmp" "$HOME/argv"
echo "training"
wait
''')
  return home


def _wait_for(path: pathlib.Path, seconds: float = 10.0) -> None:
  deadline = time.monotonic() + seconds
  while not path.exists():
    assert time.monotonic() < deadline, f'no {path}'
    time.sleep(0.02)


def _on_worker(script: str, home: pathlib.Path) -> subprocess.CompletedProcess:
  """Runs `script` as the worker's login shell would (bash -c, in ~)."""
  return subprocess.run(['bash', '-c', script], cwd=home,
                        env=dict(os.environ, HOME=str(home)),
                        capture_output=True, text=True, timeout=10,
                        check=False)


def test_run_and_stop_scripts_on_a_worker(bin_dir, tmp_path):
  """The run script returns at once, leaving the training running detached
  with exactly the flags given; a second run, or a setup, is refused while
  it runs; stop SIGTERMs it."""
  (run_line,), _ = _dry_run(
      ['run'] + POD + TRAIN + ['--', '--config.total_steps=100', NASTY],
      bin_dir, tmp_path)
  setup_lines, _ = _dry_run(['setup'] + POD, bin_dir, tmp_path)
  (stop_line,), _ = _dry_run(['stop'] + POD, bin_dir, tmp_path)
  home = _fake_home(tmp_path)
  pid = None
  try:
    start = time.monotonic()
    done = _on_worker(_remote_script(run_line), home)
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - start < 5  # It does not wait for the run.
    assert done.stdout.endswith('started; log ~/refseg_run.log\n')
    _wait_for(home / 'argv')
    pid = int((home / 'refseg_run.pid').read_text())
    assert (home / 'argv').read_text().split('\0')[:-1] == [
        '-m', 'refseg_jax.main', '--distributed',
        '--config=configs/full.py:model=r101', '--workdir=gs://bucket/run',
        '--config.data.data_dir=gs://bucket/tfds', '--config.total_steps=100',
        NASTY]
    assert not list(tmp_path.rglob('pwned'))
    assert (home / 'cwd').read_text().strip() == str(home / 'refseg_jax')
    assert os.getsid(pid) == pid  # Its own session: no SIGHUP from ssh.
    _wait_for(home / 'refseg_run.log')
    again = _on_worker(_remote_script(run_line), home)
    assert again.returncode == 1
    assert f'a run is going (pid {pid}); stop it first' in again.stderr
    setup = _on_worker(_remote_script(setup_lines[2]), home)
    assert setup.returncode == 1
    assert 'a run is going; stop it first' in setup.stderr
    assert (home / 'refseg_jax').is_dir()
    stopped = _on_worker(_remote_script(stop_line), home)
    assert f'SIGTERM sent to pid {pid}' in stopped.stdout
    _wait_for(home / 'term')
    deadline = time.monotonic() + 10
    while not _on_worker(_remote_script(stop_line), home).stdout.endswith(
        ': no training running\n'):
      assert time.monotonic() < deadline
      time.sleep(0.05)
    assert 'training\n' in (home / 'refseg_run.log').read_text()
  finally:
    if pid is not None and not (home / 'term').exists():
      os.killpg(pid, signal.SIGKILL)  # Its session's group: python, sleep.


def test_run_refuses_a_workdir_the_hosts_do_not_share(bin_dir, tmp_path):
  for flags in (['--workdir=/tmp/run'],
                ['--workdir=gs://bucket/run', '--data_dir=/data/tfds']):
    done = _launch(['--dry-run', 'run'] + POD + ['--config=configs/full.py']
                   + flags, bin_dir, tmp_path)
    assert done.returncode == 2
    assert 'is not on gs://' in done.stderr
    assert not done.stdout
  # A filesystem every worker mounts is allowed when said so.
  commands, notes = _dry_run(
      ['run'] + POD + ['--config=configs/full.py', '--workdir=/mnt/nfs/run',
                       '--shared_fs'], bin_dir, tmp_path)
  assert '--workdir=/mnt/nfs/run' in _remote_script(commands[0])
  assert notes[0].startswith('No --data_dir')


def test_flags_after_double_dash_are_for_run_only(bin_dir, tmp_path):
  done = _launch(['--dry-run', 'stop'] + POD + ['--', '--x=1'], bin_dir,
                 tmp_path)
  assert done.returncode == 2
  assert 'for `run` only' in done.stderr


def test_without_gcloud_it_stops_before_running_anything(bin_dir, tmp_path):
  for args in (['delete'] + POD, ['setup'] + POD):
    done = _launch(args, bin_dir, tmp_path)
    assert done.returncode == 2
    assert 'gcloud is not on PATH' in done.stderr
    assert not (tmp_path / 'executed').exists()


def test_real_mode_runs_what_dry_run_prints(tmp_path):
  """`setup` in a small repository with a fake gcloud: the tarball holds the
  tracked and untracked files but not the ignored ones, and gcloud gets
  exactly the printed commands."""
  repo = tmp_path / 'repo'
  (repo / 'launch').mkdir(parents=True)
  (repo / 'launch' / 'tpu_pod.py').write_text(LAUNCHER.read_text())
  (repo / 'tracked.py').write_text('x = 1\n')
  (repo / 'untracked.txt').write_text('vocab\n')
  (repo / '.gitignore').write_text('.venv/\n')
  (repo / '.venv').mkdir()
  (repo / '.venv' / 'ignored').write_text('')
  subprocess.run(['git', 'init', '-q'], cwd=repo, check=True)
  subprocess.run(['git', 'add', 'tracked.py', '.gitignore', 'launch'],
                 cwd=repo, check=True)
  fake = tmp_path / 'fake'
  fake.mkdir()
  calls = tmp_path / 'gcloud_calls'
  _write_script(fake / 'gcloud', f'''#!{sys.executable}
import json, sys
with open({str(calls)!r}, 'a') as f:
  f.write(json.dumps(sys.argv[1:]) + '\\n')
''')
  path = f'{fake}{os.pathsep}{os.environ["PATH"]}'
  args = ['setup'] + POD
  launcher = repo / 'launch' / 'tpu_pod.py'
  printed = _launch(['--dry-run'] + args, path, tmp_path, cwd=repo,
                    launcher=launcher)
  done = _launch(args, path, tmp_path, cwd=repo, launcher=launcher)
  assert done.returncode == 0, done.stderr
  expected = [shlex.split(line) for line in printed.stdout.splitlines()]
  assert [f'+ {line}' for line in printed.stdout.splitlines()] == \
      done.stdout.splitlines()
  assert [['gcloud'] + json.loads(line)
          for line in calls.read_text().splitlines()] == expected[1:]
  with tarfile.open(tmp_path / 'refseg_jax-refseg-pod.tar.gz') as tar:
    assert sorted(tar.getnames()) == ['.gitignore', 'launch/tpu_pod.py',
                                      'tracked.py', 'untracked.txt']


def test_slurm_script_runs_main_distributed(tmp_path):
  _write_script(tmp_path / 'srun', '#!/bin/sh\nprintf "%s\\n" srun "$@"\n')
  env = dict(os.environ, PATH=f'{tmp_path}{os.pathsep}{os.environ["PATH"]}',
             CONFIG='configs/full.py:model=r101', WORKDIR='/shared/run')
  done = subprocess.run(['bash', str(SBATCH), '--config.total_steps=500',
                         '--config.data.tokenizer=my vocab'],
                        capture_output=True, text=True, env=env, check=True)
  assert done.stdout.splitlines() == [
      'srun', '--kill-on-bad-exit=1', 'python', '-m', 'refseg_jax.main',
      '--distributed', '--config=configs/full.py:model=r101',
      '--workdir=/shared/run', '--config.total_steps=500',
      '--config.data.tokenizer=my vocab']
  del env['WORKDIR']
  done = subprocess.run(['bash', str(SBATCH)], capture_output=True, text=True,
                        env=env, check=False)
  assert done.returncode != 0
  assert 'WORKDIR' in done.stderr and not done.stdout


def test_slurm_header_runs_one_task_per_gpu():
  options = dict(line[len('#SBATCH '):].split('=', 1)
                 for line in SBATCH.read_text().splitlines()
                 if line.startswith('#SBATCH '))
  assert options['--ntasks-per-node'] == options['--gpus-per-node']
  assert '--gpus-per-task' not in options
  assert options['--signal'].startswith('TERM@')


@pytest.mark.parametrize(
    'ntasks,procid,localid',
    [(2, 1, 0),   # Task 1 of 2, one a node.
     (8, 5, 1)])  # 2 nodes of 4 GPUs, a task a GPU: node002's second GPU.
def test_jax_reads_the_slurm_task(monkeypatch, ntasks, procid, localid):
  """What `--distributed` (jax.distributed.initialize()) makes of a task of
  `srun` on nodes node[001-002]."""
  for name in list(os.environ):
    if name.startswith(('SLURM_', 'OMPI_', 'JAX_', 'KUBERNETES_')):
      monkeypatch.delenv(name)
  monkeypatch.setattr(cluster_lib, 'running_in_cloud_tpu_vm', False)
  for name, value in {
      'SLURM_JOB_ID': '123456', 'SLURM_JOB_NODELIST': 'node[001-002]',
      'SLURM_STEP_NODELIST': 'node[001-002]', 'SLURM_STEP_NUM_NODES': '2',
      'SLURM_NTASKS': str(ntasks), 'SLURM_PROCID': str(procid),
      'SLURM_LOCALID': str(localid)}.items():
    monkeypatch.setenv(name, value)
  port = 123456 % 4096 + 61440  # slurm_cluster.py: from the job id.
  assert clusters.ClusterEnv.auto_detect_unset_distributed_params(
      None, None, None, None, None, None) == (
          f'node001:{port}', ntasks, procid, [localid])


def test_docs_show_what_the_launcher_prints(tmp_path):
  """docs/launch.md's dry-run transcript is the launcher's output."""
  text = (REPO / 'docs' / 'launch.md').read_text()
  prompt = '$ python launch/tpu_pod.py '
  start = text.index('```\n' + prompt) + len('```\n')
  transcript = text[start:text.index('```', start)].splitlines()
  printed = []
  for line in transcript:
    if line.startswith(prompt):
      # Run from the repository root, the tarball in /tmp, as documented.
      done = _launch(shlex.split(line[len(prompt):]), tmp_path, '/tmp')
      assert done.returncode == 0, done.stderr
      printed += [line] + done.stdout.splitlines()
  assert len([line for line in printed if line.startswith(prompt)]) == 6
  assert transcript == printed
