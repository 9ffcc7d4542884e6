"""The train-step benchmark: its figures, its command, its errors.

One command run (the tiny SaG config, batch 4, 2 timed steps, on one of the
fake CPU devices) is shared by the module; one more compilation (batch 8)
checks that the FLOPs scale with the batch. ~1 min on 2 cores.
"""

import contextlib
import io
import json
import pathlib

import jax
import numpy as np
import pytest

from refseg_jax import config_lib
from refseg_jax import sharding
from refseg_jax import tasks
from refseg_jax import train
from refseg_jax import train_state
from refseg_jax.benchmarks import train_step
from refseg_jax.data import pipeline
from refseg_jax.evaluation import evaluator

REPO = pathlib.Path(__file__).parents[1]
TEXT = f'{REPO}/configs/text.py:data=ref_shapes_tiny'
FULL = f'{REPO}/configs/full.py:data=ref_shapes_tiny'
PEAK_SIZE = 256


@pytest.fixture(scope='module')
def command(tmp_path_factory):
  """(stdout lines, the --json report) of one run of what the command runs
  (its flags are defined only when it runs as a program)."""
  path = tmp_path_factory.mktemp('train_step') / 'report.json'
  config = train_step.configure(config_lib.load(TEXT), batch_size=4,
                                eval_batch_size=4)
  report = train_step.command_report(
      config, TEXT, {}, steps=2, warmup=1, num_devices=1,
      peak_size=PEAK_SIZE)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    train_step.emit(report, str(path))
  return out.getvalue().splitlines(), json.loads(path.read_text())


def test_command_prints_the_report_and_a_summary_line(command):
  lines, report = command
  assert json.loads('\n'.join(lines[:-1])) == report
  assert report['config_spec'].endswith('configs/text.py:data=ref_shapes_tiny')
  assert (report['task'], report['batch_size'],
          report['expressions_per_image'], report['images_per_batch'],
          report['eval_batch_size']) == ('sag_text', 4, 2, 2, 4)
  assert report['config']['batch_size'] == 4
  assert (report['backend'], report['num_devices']) == ('cpu', 1)
  assert report['jax_version'] == jax.__version__
  assert report['cpu_count'] >= 1 and report['process_threads'] >= 1
  train, evaluation = report['train'], report['eval']
  assert lines[-1] == train_step.summary(report)
  assert lines[-1].startswith(
      f"train: {train['s_per_step']:.3g} s/step, "
      f"{train['examples_per_s']:.3g} ex/s, {train['gflop_per_s']:.3g} "
      f"GFLOP/s, MFU {100 * train['mfu']:.3g}% of "
      f"{report['peak']['gflop_per_s']:.3g} GFLOP/s float32 matmul; ")
  assert (f" | eval: {evaluation['s_per_step']:.3g} s/batch, "
          f"{evaluation['examples_per_s']:.3g} ex/s") in lines[-1]
  assert f"compile {train['compile_s']:.3g} s |" in lines[-1]


def test_speed_figures_follow_from_the_timed_steps(command):
  _, report = command
  peak = report['peak']
  assert (peak['size'], peak['devices'], peak['dtype']) == (PEAK_SIZE, 1,
                                                            'float32')
  assert peak['gflop_per_s'] == pytest.approx(
      2 * PEAK_SIZE ** 3 * peak['repeats'] / peak['best_s'] / 1e9)
  # Measured before and after the timed steps; the faster counts.
  assert len(peak['measured_gflop_per_s']) == 2
  assert peak['gflop_per_s'] == max(peak['measured_gflop_per_s'])
  for section, batch in ((report['train'], 4), (report['eval'], 4)):
    assert section['steps_timed'] == 2
    assert 0 < section['s_per_step_min'] <= section['s_per_step'] <= (
        section['s_per_step_max'])
    assert section['examples_per_s'] == pytest.approx(
        batch / section['s_per_step'])
    assert section['gflop_per_s'] == pytest.approx(
        section['gflop_per_step'] / section['s_per_step'])
    assert section['mfu'] == pytest.approx(
        section['gflop_per_s'] / peak['gflop_per_s'])
    assert section['compile_s'] > 0
    assert section['peak_rss_gb'] > 0.1  # JAX and TensorFlow alone.
    assert section['device_peak_bytes'] is None  # CPU: no statistics.
  assert report['peak_rss_gb'] >= report['eval']['peak_rss_gb']


def test_memory_holds_the_state_and_gflop_doubles_with_the_batch(command):
  _, report = command
  config = train_step.configure(config_lib.load(TEXT), batch_size=8,
                                eval_batch_size=4)
  task = tasks.build(config, report['vocab_size'])
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  state, _ = train_state.shapes_and_shardings(config, task, mesh)
  param_bytes = sum(x.size * x.dtype.itemsize
                    for x in jax.tree.leaves(state.params))
  assert report['param_bytes'] == param_bytes
  for section in (report['train'], report['eval']):
    memory = section['memory']
    assert min(memory['argument_size_in_bytes'],
               memory['output_size_in_bytes'],
               memory['temp_size_in_bytes']) > 0
  # The train step takes the params and Adam's two moments of them; the
  # eval step nearly all params (jit drops the slot decoder's, which only
  # the reconstruction loss reads).
  assert report['train']['memory']['argument_size_in_bytes'] >= (
      3 * param_bytes)
  assert 0.9 * param_bytes < report['eval']['memory'][
      'argument_size_in_bytes'] < 2 * param_bytes

  doubled = train_step.run(config, compile_only=True, evaluate=False,
                           num_devices=1)
  assert doubled['eval'] is None and 'peak' not in doubled
  assert 's_per_step' not in doubled['train']
  small, large = report['train'], doubled['train']
  assert 1.8 < large['gflop_per_step'] / small['gflop_per_step'] < 2.2
  assert large['gflop_per_example'] == pytest.approx(
      small['gflop_per_example'], rel=0.1)
  # The model's FLOPs (the unoptimised program) and XLA's count of the
  # compiled one agree within its optimisations (measured: 0.4 %).
  assert large['gflop_per_step'] == pytest.approx(large['gflop_per_device'],
                                                  rel=0.02)
  # Scanned, rematerialised blocks: the model's FLOPs stay those of the
  # unrolled model, while XLA's count of the compiled program changes (it
  # sees each scan's body once, plus remat's recomputation: 1.02 against
  # 1.07 GFLOP here).
  config.model.update(scan_layers=True, remat='nothing_saveable')
  scanned = train_step.run(config, compile_only=True, evaluate=False,
                           num_devices=1)['train']
  assert scanned['gflop_per_step'] == large['gflop_per_step']
  assert scanned['gflop_per_device'] != pytest.approx(
      large['gflop_per_device'], rel=0.02)
  # Twice the activations, the same state.
  assert large['memory']['temp_size_in_bytes'] > (
      1.5 * small['memory']['temp_size_in_bytes'])
  assert train_step.summary(doubled).startswith(
      f"train: {large['gflop_per_step']:.3g} GFLOP/step "
      f"({large['gflop_per_example']:.3g}/example); mem args ")


def test_synthetic_batches_fit_the_task_as_the_pipeline_would():
  config = train_step.configure(config_lib.load(FULL), batch_size=8,
                                expressions_per_image=2, eval_batch_size=8)
  vocab, source = train_step.vocab_size(config)
  assert source == 'tokenizer'
  task = tasks.build(config, vocab)
  batch = train_step.train_batch(config, task.supervision, vocab)
  size, length = config.data.image_size, config.data.max_text_len
  assert set(batch) == set(pipeline.SUPERVISION_FIELDS['full'])
  assert (batch['image'].shape, batch['image'].dtype) == ((4, size, size, 3),
                                                          np.uint8)
  assert batch['mask'].shape == (8, size, size)
  assert batch['text_tokens'].shape == batch['text_mask'].shape == (8, length)
  assert (batch['text_tokens'] < vocab).all()
  assert (batch['text_tokens'][batch['text_mask'] == 0] == 0).all()
  assert (batch['text_mask'].sum(1) >= 2).all()
  box, clicks = batch['box'], batch['clicks']
  assert (box[:, :2] < box[:, 2:]).all() and box.max() <= 1
  assert (clicks[:, 0] > box[:, :2]).all() and (clicks[:, 0] < box[:, 2:]).all()
  np.testing.assert_allclose(clicks[:, 1:], box.reshape(8, 2, 2))
  # The mask is the box: about its area of the canvas.
  np.testing.assert_allclose(
      batch['mask'].mean((1, 2)),
      (box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1]), atol=0.05)
  text = train_step.train_batch(config, 'text', vocab)
  assert set(text) == set(pipeline.SUPERVISION_FIELDS['text'])
  np.testing.assert_array_equal(text['image_id'], np.arange(4))

  # The real train and eval steps take them (traced only).
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  state, shardings = train_state.shapes_and_shardings(config, task, mesh)
  step = train.make_train_step(config, task, mesh, shardings)
  _, metrics = jax.eval_shape(step, state, batch)
  assert {'dice', 'bce', 'heatmap', 'box'} <= set(metrics)
  eval_inputs = train_step.eval_batch(config, vocab)
  assert set(eval_inputs) == set(pipeline.EVAL_FIELDS) - set(
      evaluator.HOST_ONLY_FIELDS)
  _, response = jax.eval_shape(
      evaluator.make_eval_step(task, mesh, shardings.eval_variables()),
      state.eval_variables(), eval_inputs)
  assert response.shape == (8, size, size)


def test_bad_input_is_named():
  config = config_lib.load(TEXT)
  with pytest.raises(ValueError, match=r'batch_size=6 is not divisible by '
                     r'expressions_per_image=4'):
    train_step.run(train_step.configure(config, 6, 4), compile_only=True)
  # Eight (fake) devices: the batch is split over all of them.
  assert jax.device_count() == 8
  with pytest.raises(ValueError, match=r"batch_size=4 \(4 expressions\) is "
                     r"not divisible by the mesh's 8 devices"):
    train_step.run(train_step.configure(config, 4, 1), compile_only=True)
  with pytest.raises(ValueError, match=r"batch_size=8 \(4 images\) is not "
                     r"divisible by the mesh's 8 devices"):
    train_step.run(train_step.configure(config, 8, 2), compile_only=True)
  with pytest.raises(ValueError, match=r'eval_batch_size=12 \(12 '
                     r'expressions\)'):
    train_step.run(train_step.configure(config, 8, 1, 12), compile_only=True)
  with pytest.raises(ValueError, match=r'--batch_size=0 must be positive'):
    train_step.configure(config, 0)
  with pytest.raises(ValueError, match=r'--expressions_per_image=-1'):
    train_step.configure(config, 8, -1)
  with pytest.raises(ValueError, match=r"Unknown config key 'model.dimm' "
                     r'\(value 3\)'):
    train_step.configure(config, overrides={'model.dimm': 3})
  with pytest.raises(ValueError, match=r"Unknown config key 'nodata.x'"):
    train_step.configure(config, overrides={'nodata.x': 3})
  with pytest.raises(ValueError, match=r"Unknown config argument 'dat'"):
    config_lib.load(f'{REPO}/configs/text.py:dat=ref_shapes_tiny')
  with pytest.raises(ValueError, match=r'--steps=0 must be >= 1'):
    train_step.run(train_step.configure(config, 8, 1), steps=0)
  assert config.batch_size == 32  # configure copies.


def test_flops_and_memory_read_every_analysis_form():

  class Compiled:

    def __init__(self, cost, stats=None):
      self.cost, self.stats = cost, stats

    def cost_analysis(self):
      return self.cost

    def memory_analysis(self):
      return self.stats

  assert train_step.flops(Compiled({'flops': 3e9})) == 3e9
  assert train_step.flops(Compiled([{'flops': 1e9}, {'flops': 2e9}])) == 3e9
  assert train_step.flops(Compiled(None)) is None
  assert train_step.flops(Compiled([{'bytes accessed': 1.0}])) is None
  assert train_step.memory(Compiled(None)) is None
  report = train_step.cost_report(Compiled({'flops': 2e9}), 1.5, 8, 8e9)
  assert (report['gflop_per_device'], report['gflop_per_step'],
          report['gflop_per_example']) == (2.0, 8.0, 1.0)
  figures = train_step.rates([3.0, 1.0, 2.0], 8, 10.0, 20.0)
  assert (figures['s_per_step'], figures['examples_per_s'],
          figures['gflop_per_s'], figures['mfu']) == (2.0, 4.0, 5.0, 0.25)
  assert train_step.rates([1.0], 8, None, 20.0)['mfu'] is None
  assert train_step.split_batch(32, 0, 8) == (32, 32)
  assert train_step.split_batch(32, 4, 8) == (8, 32)
