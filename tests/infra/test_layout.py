"""The package's layers, read from its imports: no cycles, and no module importing a higher layer.

Layers, lowest first (the package docstring says the same):
    infra -> data, model -> ppo -> grpo, display -> stages -> bench -> studies -> the top (`cli`, `__init__`, `__main__`)
A module may import its own subpackage and any lower layer, at module level or inside a function.
"""

import ast
from pathlib import Path

import pytest

import marl_utils

PACKAGE = Path(marl_utils.__file__).resolve().parent
LAYERS = {"infra": 0, "data": 1, "model": 1, "ppo": 2, "grpo": 3, "display": 3, "stages": 4, "bench": 5, "studies": 6, "": 7}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(name: str) -> bool:
    return (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists()


def imports_of(path: Path) -> set[str]:
    """Every marl_utils module this file imports, at any depth of the file (functions included)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("marl_utils"):
                continue
            for alias in node.names:  # `from .pkg import module` names a module; `from .module import x` does not
                candidate = f"{target}.{alias.name}"
                found.add(candidate if (PACKAGE.parent / (candidate.replace(".", "/") + ".py")).exists()
                          or is_package(candidate) else target)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("marl_utils")}
    found.discard(name)
    return found


def layer_of(name: str) -> tuple[str, int]:
    parts = name.split(".")
    sub = parts[1] if len(parts) > 2 or (len(parts) == 2 and is_package(name)) else ""
    return sub, LAYERS[sub]


GRAPH = {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def test_every_subpackage_has_a_layer():
    subpackages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert subpackages == set(LAYERS) - {""}


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_no_import_reaches_a_higher_layer(name):
    sub, layer = layer_of(name)
    upward = []
    for target in GRAPH[name]:
        if target == "marl_utils":  # only the top level may import the public API from the package itself
            if layer < LAYERS[""]:
                upward.append(target)
            continue
        target_sub, target_layer = layer_of(target)
        if target_layer > layer or (target_layer == layer and target_sub != sub):
            upward.append(target)
    assert not upward, f"{name} (layer {sub or 'top'}) imports {sorted(upward)}: a higher or sibling layer"


def test_no_import_cycles():
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(GRAPH.get(node, ())):
            if target not in GRAPH:
                continue
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for node in sorted(GRAPH):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_checker_reads_relative_and_function_level_imports():
    """The rules above are only as good as the parse: known imports of each form must be seen."""
    assert "marl_utils.bench.layouts" in GRAPH["marl_utils.bench.memory"]  # `from . import layouts as bl`, in a function
    assert "marl_utils.grpo.trainers" in GRAPH["marl_utils.stages.grpo"]  # `from ..grpo.trainers import ...`
    assert "marl_utils.ppo.trainer" in GRAPH["marl_utils"]  # the public API
    assert layer_of("marl_utils.stages.ppo") == ("stages", LAYERS["stages"])
    assert layer_of("marl_utils.cli") == ("", LAYERS[""])
