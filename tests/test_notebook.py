"""notebooks/quickstart.ipynb runs top to bottom (its QUICK switch on)."""

import json
import pathlib

import nbclient
import nbformat

REPO = pathlib.Path(__file__).parents[1]
NOTEBOOK = REPO / 'notebooks' / 'quickstart.ipynb'


def test_quickstart_is_committed_without_outputs():
  notebook = json.loads(NOTEBOOK.read_text())
  code = [c for c in notebook['cells'] if c['cell_type'] == 'code']
  assert code and all(not c['outputs'] and c['execution_count'] is None
                      for c in code)


def test_quickstart_runs_top_to_bottom(tiny_data_dir, tmp_path, monkeypatch):
  # The kernel inherits this environment: the notebook's small-size switch,
  # the session's tiny dataset, a fresh workdir, and one CPU device as on
  # Colab (not the suite's 8 fake ones).
  monkeypatch.setenv('REFSEG_QUICKSTART_QUICK', '1')
  monkeypatch.setenv('REFSEG_QUICKSTART_DATA_DIR', tiny_data_dir)
  monkeypatch.setenv('REFSEG_QUICKSTART_WORKDIR', str(tmp_path / 'run'))
  monkeypatch.delenv('XLA_FLAGS', raising=False)
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(notebook, timeout=600, kernel_name='python3',
                          resources={'metadata': {'path': str(REPO)}}
                          ).execute()
  outputs = [o for c in notebook.cells if c.cell_type == 'code'
             for o in c.outputs]
  assert not [o for o in outputs if o.output_type == 'error']
  text = ''.join(o.get('text', '') for o in outputs)
  assert '| validation | 160 |' in text  # The evaluation table.
  assert "'validation': 48" in text  # The dataset's images per split.
  assert any('image/png' in o.get('data', {}) for o in outputs)  # The plot.
  assert (tmp_path / 'run' / 'results.json').exists()
