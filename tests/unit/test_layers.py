"""The package's import graph, read from the source (function-level imports included, and a module named in a string,
as ``importlib.import_module("braintumor.x.y")`` or an entry-point-style ``"braintumor.x.y:attr"`` would load it): no
module imports itself back through others, and each layer imports only the layers ARCHITECTURE.md allows."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ("train", "export", "serving", "clients", "loadtest")
ALLOWED = {  # layer -> the layers of ours it may import (itself always)
    "train": set(),
    "export": {"train"},
    "serving": {"train", "export", "clients"},
    "clients": set(),
    "loadtest": {"train", "export", "serving", "clients"},  # the top: it runs and measures the others
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["braintumor", *parts])


def _modules() -> dict[str, Path]:
    found = {}
    for layer in LAYERS:
        for path in (ROOT / layer).rglob("*.py"):
            if path.parent.name == "python_backend":
                continue  # runs in Triton's python stub, not in the package
            found[_module_name(path)] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    tree = ast.parse(path.read_text())
    # `[python, "-m", "braintumor.x"]` starts another process: a command line, not an import
    run_as_main = {id(b) for n in ast.walk(tree) if isinstance(n, (ast.List, ast.Tuple))
                   for a, b in zip(n.elts, n.elts[1:]) if isinstance(a, ast.Constant) and a.value == "-m"}
    for node in ast.walk(tree):
        targets: list[str] = []
        if (isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("braintumor.")
                and id(node) not in run_as_main):
            # a string naming one of our modules is an import by name (import_module, entry points, mock targets)
            candidate = node.value.split(":", 1)[0].strip()
            if candidate in known:
                targets = [candidate]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from pkg import module` depends on the module; `from module import name` on the module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for target in targets:
            while target and target not in known:  # `from .x import name` -> module .x
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _layer(module: str) -> str:
    return module.split(".")[1]


def test_the_graph_sees_known_imports():
    graph = _graph()
    assert "braintumor.train.preprocess" in graph["braintumor.serving.pipeline"]
    assert "braintumor.train.decode" in graph["braintumor.serving.pipeline"]
    assert "braintumor.clients.score_files" in graph["braintumor.clients.score_eval"]


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _wrong(graph: dict[str, set[str]], layer: str) -> list[str]:
    return sorted(f"{m} -> {t}" for m, targets in graph.items() if _layer(m) == layer
                  for t in targets if _layer(t) != layer and _layer(t) not in ALLOWED[layer])


@pytest.mark.parametrize("layer", LAYERS)
def test_layer_imports_only_what_it_may(layer):
    assert _wrong(_graph(), layer) == []


@pytest.mark.parametrize("source", [
    'import importlib\nimportlib.import_module("braintumor.loadtest.commands")\n',
    'COMMANDS = ("braintumor.train.commands", "braintumor.loadtest.commands")\n',
    'TARGET = "braintumor.loadtest.commands:register"\n',
])
def test_a_planted_string_import_is_seen(tmp_path, source):
    """A serving module that loads loadtest by name breaks the layering as an import statement would."""
    planted = tmp_path / "planted.py"
    planted.write_text(source)
    graph = _graph()
    graph["braintumor.serving.planted"] = _imports("braintumor.serving.planted", planted, set(graph))
    assert "braintumor.loadtest.commands" in graph["braintumor.serving.planted"]
    assert _wrong(graph, "serving") == ["braintumor.serving.planted -> braintumor.loadtest.commands"]
    graph["braintumor.loadtest.commands"].add("braintumor.serving.planted")  # loadtest imports serving: a cycle
    assert _cycles(graph)


def test_nothing_imports_loadtest():
    """loadtest is the top layer: it reaches `braintumor` as a plugin entry point (serving/cli.py), never by name."""
    graph = _graph()
    assert sorted(m for m, targets in graph.items() if _layer(m) != "loadtest"
                  for t in targets if _layer(t) == "loadtest") == []


DECODING = {"braintumor.train.decode", "braintumor.train.decode_dicom", "braintumor.train.decode_common"}


def test_decoding_is_a_leaf():
    """Every layer reads pixels through train/decode.py; it and its two halves (DICOM, the shared rules) build on
    nothing else of ours."""
    graph = _graph()
    assert {module: graph[module] - DECODING for module in DECODING} == {module: set() for module in DECODING}
