"""The shape of the package: no import cycle, no dispatch on model classes."""

import ast
import pathlib

REPO = pathlib.Path(__file__).parents[1]
PACKAGE = REPO / 'refseg_jax'


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(REPO).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def import_graph() -> dict[str, set[str]]:
  """{module: the refseg_jax modules it imports}, at any depth of the file
  (a function-level import closes a cycle as surely as a top-level one)."""
  modules = {_module_name(p): p for p in PACKAGE.rglob('*.py')}
  graph = {}
  for name, path in modules.items():
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        imported.update(alias.name for alias in node.names)
      elif isinstance(node, ast.ImportFrom) and node.module:
        # `from refseg_jax.x import y`: y is a module of package x (which
        # Python starts first, whatever imports it), or a name x defines.
        for alias in node.names:
          submodule = f'{node.module}.{alias.name}'
          imported.add(submodule if submodule in modules else node.module)
    graph[name] = {m for m in imported if m in modules and m != name}
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle of `graph` (its modules in order), or None."""
  state = {}  # Absent: unvisited; 1: on the current path; 2: done.

  def visit(node, path):
    state[node] = 1
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      if nxt not in state:
        cycle = visit(nxt, path + [nxt])
        if cycle:
          return cycle
    state[node] = 2
    return None

  for start in sorted(graph):
    if start not in state:
      cycle = visit(start, [start])
      if cycle:
        return cycle
  return None


def test_find_cycle_finds_one():
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c',
                                                               'a']
  assert find_cycle({'a': {'b'}, 'b': set(), 'c': {'a', 'b'}}) is None


def test_the_package_has_no_import_cycle():
  graph = import_graph()
  assert 'refseg_jax.tasks' in graph['refseg_jax.train']  # The graph is real.
  assert find_cycle(graph) is None, find_cycle(graph)


def test_no_isinstance_dispatch_on_model_classes():
  """Code picks behaviour through the task registry (`config.task`), not by
  asking which model class it holds."""
  model_classes = {'PKS', 'SaG'}
  offenders = []
  for path in PACKAGE.rglob('*.py'):
    for node in ast.walk(ast.parse(path.read_text())):
      if (isinstance(node, ast.Call) and getattr(node.func, 'id', None) in (
          'isinstance', 'issubclass') and len(node.args) == 2):
        names = {n.attr if isinstance(n, ast.Attribute) else getattr(
            n, 'id', None) for n in ast.walk(node.args[1])}
        if names & model_classes:
          offenders.append(f'{path.relative_to(REPO)}:{node.lineno}')
  assert not offenders


def test_flags_are_defined_only_when_a_command_runs():
  """Every command defines its absl flags under `if __name__ ==
  '__main__'`, so importing any module (tests, notebooks, another command)
  defines none and no two commands' flags collide."""
  offenders, defined_under_main = [], 0
  for path in PACKAGE.rglob('*.py'):
    tree = ast.parse(path.read_text())
    for node in tree.body:
      is_main = (isinstance(node, ast.If) and 'main' in ast.unparse(node.test))
      for n in ast.walk(node):
        if isinstance(n, ast.Attribute) and n.attr.startswith('DEFINE_'):
          if is_main:
            defined_under_main += 1
          else:
            offenders.append(f'{path.relative_to(REPO)}:{n.lineno}')
  assert defined_under_main > 20 and not offenders, offenders
