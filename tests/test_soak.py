"""The soak: a run killed three times ends where an uninterrupted one does."""

import json
import subprocess
import sys

import numpy as np

from refseg_jax.tools import soak
from test_train import FULL_CONFIG
from test_train import subprocess_env


def test_three_kills_end_bit_equal_to_the_uninterrupted_run(tiny_data_dir,
                                                            tmp_path):
  workdir = tmp_path / 'soak'
  # The tiny run's 8 steps (its steps are in the compilation cache), saved
  # every 2 steps and evaluated every 4: a kill of each kind has its moment.
  command = [sys.executable, '-m', 'refseg_jax.tools.soak',
             f'--workdir={workdir}', '--kills=3', '--seed=0',
             f'--config={FULL_CONFIG}:data=ref_shapes_tiny',
             f'--config.data.data_dir={tiny_data_dir}',
             '--config.data.prepare=False', '--config.batch_size=16',
             '--config.optimizer.warmup_steps=2', '--config.total_steps=8',
             '--config.checkpoint_every_steps=2',
             '--config.eval.every_steps=4']
  finished = subprocess.run(command, capture_output=True, text=True,
                            env=subprocess_env(), timeout=900)
  assert finished.returncode == 0, finished.stdout + finished.stderr[-5000:]
  assert 'all checks pass' in finished.stdout
  report = json.loads((workdir / 'soak.json').read_text())
  assert report['failures'] == []
  assert report['bit_equal'] and report['largest_difference'] == 0.0
  assert report['same_results.json'] and report['same_eval_history.json']
  assert report['temporary_paths_left'] == []
  killed = [life for life in report['processes'] if life['killed']]
  assert sorted(life['kind'] for life in killed) == sorted(soak.KINDS)
  # Each restart resumed from the checkpoint complete at its kill.
  for before, after in zip(report['processes'], report['processes'][1:]):
    assert after['resumed_from'] == before['committed_at_exit']


def test_a_restart_from_an_older_checkpoint_fails_the_soak():
  lives = [soak.Life(1, 'random', killed=True, reached=5, committed_at_exit=4),
           soak.Life(2, None, resumed_from=2, reached=8, committed_at_exit=8)]
  failures = soak.check_lives(lives, interval=2)
  assert len(failures) == 1 and 'resumed from step 2' in failures[0]
  # Losing more than an interval (and the save in flight) fails too.
  lives[0].reached = 9
  lives[1].resumed_from = 4
  failures = soak.check_lives(lives, interval=2)
  assert len(failures) == 1 and 'lost 5 steps' in failures[0]
  lives[0].saving_at_kill = 6  # Steps 7-9 went on while 6 was saved.
  assert soak.check_lives(lives, interval=2) == []


def test_largest_difference_over_nested_states():
  a = {'params': {'w': np.zeros(3)}, 'opt': [np.ones(2), np.int32(4)]}
  b = {'params': {'w': np.array([0.0, -0.5, 0.0])},
       'opt': [np.ones(2), np.int32(4)]}
  assert soak.largest_difference(a, a) == 0.0
  assert soak.largest_difference(a, b) == 0.5
  assert soak.largest_difference(a, {'params': a['params']}) == float('inf')
