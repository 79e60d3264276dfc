"""The package's shape: no import cycles (imports inside functions included), no file over
400 lines, and torch_port free of JAX."""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "vsrllm_jax"
MAX_LINES = 400


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in PACKAGE.rglob("*.py"):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    out[name] = path
  return out


def _imported(module: str, path: pathlib.Path, known) -> set[str]:
  """The package modules that ``module`` imports anywhere in its file: ``import a.b``,
  ``from a import b`` (b a module, else a) and relative imports."""
  package = module if path.name == "__init__.py" else module.rpartition(".")[0]
  found = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      for alias in node.names:
        full = f"{base}.{alias.name}"
        found.add(full if full in known else base)
  return {m for m in found if m in known and m != module}


def import_graph() -> dict[str, set[str]]:
  modules = _modules()
  return {name: _imported(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle of ``graph`` as a list of modules (first == last), or None."""
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        cycle = visit(nxt)
        if cycle:
          return cycle
    stack.pop()
    state[node] = "done"
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def test_cycle_finder_finds_a_cycle_through_function_level_imports(tmp_path):
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
  assert find_cycle(graph) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set()}) is None
  module = tmp_path / "m.py"
  module.write_text("def f():\n  from pkg import other\n  import pkg.third\n")
  assert _imported("pkg.m", module, {"pkg", "pkg.m", "pkg.other", "pkg.third"}) == {
      "pkg.other", "pkg.third"}


def test_the_package_has_no_import_cycle():
  graph = import_graph()
  assert len(graph) > 50 and "vsrllm_jax.run.open" in graph
  assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_no_package_file_is_over_400_lines():
  long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
          if (n := len(p.read_text().splitlines())) > MAX_LINES}
  assert not long, long


@pytest.mark.parametrize("name", ["jax", "flax", "optax", "orbax"])
def test_torch_port_does_not_import_jax(name):
  graph = import_graph()
  port = [m for m in graph if m.startswith("vsrllm_jax.torch_port")]
  reached, todo = set(), list(port)
  while todo:
    m = todo.pop()
    if m not in reached:
      reached.add(m)
      todo += graph[m]
  for module in reached:
    tree = ast.parse(_modules()[module].read_text())
    for node in ast.walk(tree):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
               [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
      assert not any(n == name or n.startswith(name + ".") for n in names), (module, name)
