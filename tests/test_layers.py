"""The package's layers: no import cycles, and imports only go down the declared order; and
the tests' layout: tests/ mirrors the package, and no test file imports another.

Read from the source with ``ast`` (every import counts, those inside functions too: a lazy
import still ties the two modules together), so the structure stays as it is declared here.
"""

import ast
import re
from collections import defaultdict
from pathlib import Path

from .helpers import REPO

PACKAGE = REPO / "lipexp"
TESTS = REPO / "tests"

# Bottom to top. A module belongs to the first entry that is its name or a package above it;
# it may import from its own layer (acyclically) and from the layers below, never above.
LAYERS = [
    # the bottom: no lipexp imports of note (errors, atomic files, model modes, ranks, float32)
    ("lipexp.version", "lipexp.errors", "lipexp.files", "lipexp.model_state",
     "lipexp.distributed", "lipexp.precision", "lipexp.resume", "lipexp.divergence"),
    ("lipexp.config",),  # schema, overrides and quoting, resolvers, naming, compat
    ("lipexp.models",),
    ("lipexp.data",),
    ("lipexp.attacks",),  # threat models, their loop, the distance attacks of the evaluation
    ("lipexp.defences",),  # adversarial training, the penalty, fd, the step's objective
    ("lipexp.lipschitz",),  # bound math: bounds of models, the data set's constant
    ("lipexp.module",),  # the LightningModule composing the defences
    ("lipexp.evaluation",),
    ("lipexp.runs",),  # build, the run folder and its session, checkpoints, train, reevaluate
    ("lipexp.tune",),  # tuning: an Optuna study whose trials are runs
    ("lipexp.report",),
    ("lipexp.cli",),
    ("lipexp.api", "lipexp"),  # the public names for notebooks (lipexp.load_run, ...)
]


def imported(node: ast.ImportFrom | ast.Import, package: str) -> list[str]:
    """The modules an import statement in ``package`` may name: ``from a.b import c`` names
    ``a.b`` and ``a.b.c`` (c may be a module itself); relative imports resolved."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:  # relative: up level-1 packages from this one
        base = package.split(".")[: len(package.split(".")) - node.level + 1]
        target = ".".join([*base, *([node.module] if node.module else [])])
    else:
        target = node.module or ""
    return [target, *(f"{target}.{a.name}" for a in node.names)]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """``{module: lipexp modules it imports}`` over every .py file of the package."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = defaultdict(set)
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom | ast.Import):
                targets = imported(node, package)
            else:
                continue
            graph[name] |= {t for t in targets if t in files and t != name}
    return {name: graph[name] for name in files}


def layer(module: str) -> int:
    for i, names in enumerate(LAYERS):
        if any(module == n or (n != "lipexp" and module.startswith(f"{n}.")) for n in names):
            return i
    raise AssertionError(f"{module} is in no layer of tests/test_layers.py: declare it")


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle ``[a, b, ..., a]``, or None (depth-first search, three colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_package_has_no_import_cycle():
    found = cycle(imports())
    assert found is None, "import cycle: " + " -> ".join(found)


def upward(graph: dict[str, set[str]]) -> list[str]:
    """The imports of ``graph`` that go up the layers, as readable lines."""
    return [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
            for a, targets in sorted(graph.items()) for b in sorted(targets)
            if layer(b) > layer(a)]


def test_imports_only_go_down_the_layers():
    found = upward(imports())
    assert not found, "\n".join(found)


def test_the_checks_catch_a_cycle_and_an_upward_import():
    """The two checks above on made-up graphs: they would fail on what they look for."""
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert layer("lipexp.cli") > layer("lipexp.defences.penalty") > layer("lipexp.errors")
    assert layer("lipexp.evaluation.runner") == layer("lipexp.evaluation")
    assert upward({"lipexp.defences.penalty": {"lipexp.cli"}}) == [
        f"lipexp.defences.penalty (layer {layer('lipexp.defences')}) imports lipexp.cli "
        f"(layer {layer('lipexp.cli')})"]
    assert upward({"lipexp.cli": {"lipexp.defences.penalty", "lipexp.errors"}}) == []
    # the graph reader finds both kinds of import, lazy ones included
    graph = imports()
    assert "lipexp.defences.fd" in graph["lipexp.defences.penalty"]
    assert "lipexp.report" in graph["lipexp.cli.report"]  # imported inside a function


# --- the tests' layout ----------------------------------------------------------------------
# tests/<subpackage>/ holds the tests of lipexp.<subpackage>; tests/test_*.py those of the
# top-level modules (module.py, api.py, files.py, ...) and of the layers; tests/e2e/ the
# whole-program tests (run.py, evaluate.py, sweeps, clusters, docs, benchmarks). What two
# test files share is in tests/helpers.py (fixtures: tests/conftest.py), never in a test file.
WHOLE_PROGRAM = "e2e"
NOT_TESTS = {"fixtures"}  # run folders and results.json files of earlier versions
# a Hydra target in an override string: ``+callbacks.x={_target_:tests.runs.test_x.Callback}``
TARGET = re.compile(r"_target_\s*:\s*([\w.]+)")


def subpackages() -> set[str]:
    """lipexp's subpackages that hold code: a folder with ``__init__.py`` and modules."""
    return {p.parent.name for p in PACKAGE.glob("*/__init__.py")
            if any(m.name != "__init__.py" for m in p.parent.glob("*.py"))}


def folders_of_tests() -> set[str]:
    """The folders of tests/ that hold Python files, at any depth below them."""
    return {p.relative_to(TESTS).parts[0] for p in TESTS.glob("*/**/*.py")}


def module_of_test(name: str) -> str | None:
    """The test module (``test_*``) that the dotted ``name`` is or is inside of, if any."""
    parts = name.split(".")
    i = next((i for i, part in enumerate(parts) if part.startswith("test_")), None)
    return None if i is None else ".".join(parts[:i + 1])


def imported_test_modules(path: Path, source: str | None = None) -> list[str]:
    """The test modules that the file at ``path`` (under tests/) imports, or names as a Hydra
    ``_target_`` (in an override string or a ``{"_target_": ...}`` dict), by dotted name."""
    package = ".".join(path.relative_to(REPO).parent.parts)  # tests, tests.attacks, ...
    tree = ast.parse(path.read_text() if source is None else source, str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom | ast.Import):
            names = imported(node, package)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = TARGET.findall(node.value)
        elif isinstance(node, ast.Dict):
            names = [v.value for k, v in zip(node.keys, node.values)
                     if isinstance(k, ast.Constant) and k.value == "_target_"
                     and isinstance(v, ast.Constant) and isinstance(v.value, str)]
        else:
            continue
        for name in names:
            if (module := module_of_test(name)) and module not in found:
                found.append(module)
    return found


def test_the_tests_mirror_the_package():
    """Each subpackage of lipexp has its folder tests/<subpackage>/ with test files, and each
    folder of tests/ is a subpackage's, e2e/ or fixtures/; every one with Python files is a
    package (``__init__.py``: test files of the same name in two folders do not collide)."""
    packages = subpackages()
    assert {"attacks", "defences", "evaluation", "runs", "cli"} <= packages  # the reader works
    missing = sorted(p for p in packages if not any((TESTS / p).glob("test_*.py")))
    assert not missing, f"lipexp subpackages without tests/<subpackage>/test_*.py: {missing}"
    folders = {p.name for p in TESTS.iterdir() if p.is_dir() and p.name != "__pycache__"}
    stray = sorted(folders - packages - {WHOLE_PROGRAM} - NOT_TESTS)
    assert not stray, f"folders of tests/ that mirror no lipexp subpackage: {stray}"
    for folder in folders_of_tests() - NOT_TESTS:
        assert (TESTS / folder / "__init__.py").is_file(), f"tests/{folder}/__init__.py"
    assert not folders_of_tests() & NOT_TESTS


def test_no_test_file_imports_another():
    """Shared code lives in tests/helpers.py (and fixtures in tests/conftest.py): a test file
    imported by another would run its tests' module-level code there, and moving it would
    break the other."""
    files = sorted(TESTS.rglob("test_*.py"))
    assert len(files) > 30 and TESTS / "test_layers.py" in files
    found = {str(p.relative_to(REPO)): names for p in files
             if (names := imported_test_modules(p))}
    assert not found, found


def test_the_layout_checks_catch_a_test_import():
    """The reader on made-up sources: every spelling of importing a test module is found,
    and so is a Hydra target inside one; helpers and fixtures are not test modules."""
    path = TESTS / "attacks" / "test_made_up.py"
    target = "tests.runs." + "test_reliability.SignalAt"  # no whole target in this file
    found = imported_test_modules(path, "\n".join([
        "from .test_attacks import K", "from . import test_fmn, helpers",
        "import tests.test_api", "from ..runs.test_folder import x",
        "from tests.e2e import test_run", "from ..helpers import linear_model",
        "from .. import conftest", "import tests.helpers",
        f"cfg = '+callbacks.signal={{_target_:{target},step:3}}'",
        f"node = {{'_target_': '{target}', 'step': 3}}"]))
    assert found == ["tests.attacks.test_attacks", "tests.attacks.test_fmn", "tests.test_api",
                     "tests.runs.test_folder", "tests.e2e.test_run",
                     "tests.runs.test_reliability"]
