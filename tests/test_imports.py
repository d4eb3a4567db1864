"""Imports run one way: read from the source with `ast`, no module is imported.

Every module under siamese_jax/ and launch.py is parsed; each import of a siamese_jax module is an edge
of the import graph. Three rules hold (docs/architecture.md draws the floors):

  * no cycle among siamese_jax modules;
  * no import of a siamese_jax module inside a function (a lazy import of an optional third-party
    package may stay): what a module depends on is read from its top;
  * a module imports only from its own floor or the floors below it (FLOORS).
"""

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "siamese_jax"

# Lowest first; a module may import modules of its own floor and of the floors below. A module not
# listed here makes test_every_module_has_a_floor fail: place it where its imports put it.
FLOORS = (
    ("siamese_jax", "siamese_jax.errors", "siamese_jax.workdir", "siamese_jax.serving"),
    ("siamese_jax.data", "siamese_jax.data.*", "siamese_jax.augment", "siamese_jax.layers",
     "siamese_jax.backbones", "siamese_jax.backbones.*", "siamese_jax.models", "siamese_jax.weights",
     "siamese_jax.losses", "siamese_jax.optim", "siamese_jax.parallel", "siamese_jax.distributed",
     "siamese_jax.writers", "siamese_jax.checkpoint", "siamese_jax.metrics", "siamese_jax.metrics.*"),
    ("siamese_jax.trained", "siamese_jax.one_shot", "siamese_jax.index"),
    ("siamese_jax.training",),
    ("siamese_jax.modes", "siamese_jax.modes.*"),
    ("siamese_jax.configs", "siamese_jax.configs.*"),  # configs/, installed as siamese_jax.configs
    ("siamese_jax.api",),
    ("launch",),
)


def module_files() -> dict[str, pathlib.Path]:
  """{module name: file} for the package and launch.py."""
  files = {"launch": REPO / "launch.py"}
  for path in sorted((REPO / PACKAGE).rglob("*.py")):
    parts = path.relative_to(REPO).with_suffix("").parts
    files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  for path in sorted((REPO / "configs").rglob("*.py")):  # pyproject's package-dir: configs -> siamese_jax.configs
    parts = (PACKAGE, *path.relative_to(REPO).with_suffix("").parts)
    files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return files


MODULES = module_files()


def floor_of(module: str) -> int | None:
  for floor, patterns in enumerate(FLOORS):
    for pattern in patterns:
      if module == pattern or (pattern.endswith(".*") and module.startswith(pattern[:-1])):
        return floor
  return None


def imported_modules(node: ast.Import | ast.ImportFrom, module: str) -> list[str]:
  """The project modules an import statement of `module` loads (an imported name that is not a module,
  `from siamese_jax.errors import UserError`, counts as its module)."""
  if isinstance(node, ast.Import):
    names = [alias.name for alias in node.names]
  else:
    base = node.module or ""
    if node.level:  # relative: resolved against the importing module's package
      package = module.split(".") if MODULES.get(module, pathlib.Path()).name == "__init__.py" else \
          module.split(".")[:-1]
      base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
    names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
  found = []
  for name in names:
    while name and name not in MODULES:  # `import siamese_jax.data.pipeline as p` names the module itself
      name = name.rpartition(".")[0]
    if name and (name == "launch" or name.split(".")[0] == PACKAGE):
      found.append(name)
  return found


def imports_of(module: str) -> list[tuple[str, int, bool]]:
  """(imported module, line, inside a function?) for every project import in `module`."""
  tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
  found = []

  def visit(node: ast.AST, in_function: bool) -> None:
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      found.extend((target, node.lineno, in_function) for target in imported_modules(node, module))
    inside = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
    for child in ast.iter_child_nodes(node):
      visit(child, inside)

  visit(tree, False)
  return [(target, line, local) for target, line, local in found if target != module]


GRAPH = {module: imports_of(module) for module in MODULES}


def where(module: str, line: int) -> str:
  return f"{MODULES[module].relative_to(REPO)}:{line}"


def test_the_parser_sees_the_imports_it_must():
  # The graph is only as good as the parsing: known edges of the layout are found.
  targets = {target for target, _, _ in GRAPH["siamese_jax.training"]}
  assert {"siamese_jax.checkpoint", "siamese_jax.data.pipeline", "siamese_jax.errors"} <= targets
  assert "siamese_jax.api" in {target for target, _, _ in GRAPH["launch"]}
  assert "siamese_jax.configs.omniglot" in {target for target, _, _ in GRAPH["siamese_jax.configs.folder"]}


def test_no_import_cycle():
  state: dict[str, str] = {}  # "open" while on the DFS stack, "done" after
  stack: list[str] = []

  def visit(module: str) -> list[str] | None:
    state[module] = "open"
    stack.append(module)
    for target, _, _ in GRAPH[module]:
      if state.get(target) == "open":
        return stack[stack.index(target):] + [target]
      if target not in state and (cycle := visit(target)):
        return cycle
    stack.pop()
    state[module] = "done"
    return None

  for module in sorted(GRAPH):
    if module not in state and (cycle := visit(module)):
      pytest.fail("import cycle: " + " -> ".join(cycle))


def test_no_project_import_inside_a_function():
  local = [f"{where(module, line)} imports {target} inside a function"
           for module, edges in sorted(GRAPH.items()) for target, line, inside in edges if inside]
  assert not local, "\n".join(local)


def test_every_module_has_a_floor():
  assert not [module for module in MODULES if floor_of(module) is None], \
      f"modules missing from FLOORS in {pathlib.Path(__file__).name}: " \
      f"{sorted(module for module in MODULES if floor_of(module) is None)}"


def test_imports_go_down_the_floors():
  upward = [f"{where(module, line)}: {module} (floor {floor_of(module)}) imports {target} "
            f"(floor {floor_of(target)})"
            for module, edges in sorted(GRAPH.items()) for target, line, _ in edges
            if None not in (floor_of(module), floor_of(target)) and floor_of(target) > floor_of(module)]
  assert not upward, "\n".join(upward)


@pytest.mark.parametrize("lower, higher", [("siamese_jax.metrics.*", "siamese_jax.trained"),
                                           ("siamese_jax.metrics.*", "siamese_jax.modes.*"),
                                           ("siamese_jax.metrics.*", "siamese_jax.training"),
                                           ("siamese_jax.trained", "siamese_jax.modes.*"),
                                           ("siamese_jax.trained", "siamese_jax.training"),
                                           ("siamese_jax.*", "launch")])
def test_named_floors_stay_below(lower, higher):
  # The rules of the layout spelled out, so that reordering FLOORS cannot quietly drop one.
  def matches(module, pattern):
    return module == pattern or (pattern.endswith(".*") and module.startswith(pattern[:-1]))
  wrong = [f"{where(module, line)}: {module} imports {target}" for module, edges in sorted(GRAPH.items())
           if matches(module, lower) for target, line, _ in edges if matches(target, higher)]
  assert not wrong, "\n".join(wrong)
