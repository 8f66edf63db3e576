"""The package's layers: no import cycles, and imports only go down the declared order.

Read from the source with ``ast`` (every import counts, those inside functions too: a lazy
import still ties the two modules together), so the structure stays as it is declared here.
"""

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lipexp"

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
    ("lipexp.report",),
    ("lipexp.cli",),
    ("lipexp.api", "lipexp"),  # the public names for notebooks (lipexp.load_run, ...)
]


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
            if isinstance(node, ast.ImportFrom):
                if node.level:  # relative: up level-1 packages from this one
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    target = node.module or ""
                # ``from lipexp.x import y``: y may be a module itself
                targets = [target, *(f"{target}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
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
