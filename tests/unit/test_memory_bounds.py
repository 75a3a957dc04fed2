"""ONNX Runtime's arena rule exists twice (the python backend cannot import our package): the two copies of
ArenaShrink are the same code with the same constants, and the rule shrinks once, after a flood, not during one."""

import ast
from pathlib import Path

import pytest

from braintumor.export.repository import PYTHON_BACKEND_MODEL

ort = pytest.importorskip("onnxruntime")

from braintumor.serving import local_model  # noqa: E402
from braintumor.serving.local_model import ARENA_KEEP_BATCH, SHRINK_AFTER_S, ArenaShrink  # noqa: E402

NAMES = ("ARENA_KEEP_BATCH", "SHRINK_AFTER_S", "SHRINK_ARENA")


def _rule(path: Path) -> tuple[dict, str]:
    source = path.read_text()
    tree = ast.parse(source)
    constants = {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body
                 if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
                 and node.targets[0].id in NAMES}
    cls = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "ArenaShrink")
    return constants, ast.get_source_segment(source, cls)


def test_the_python_backend_and_the_local_model_share_the_arena_rule():
    assert _rule(PYTHON_BACKEND_MODEL) == _rule(Path(local_model.__file__))


def test_no_shrink_while_large_batches_keep_coming_then_one_after_the_flood():
    options = object()
    arena = ArenaShrink(options)
    assert arena.run_options(1, now=0.0) is None  # nothing grown, nothing to give back
    assert arena.run_options(32, now=1.0) is None  # a large batch grows the arena; no shrink during a flood
    assert arena.run_options(3, now=1.2) is None  # a small batch in the middle of the flood: still none
    assert arena.run_options(32, now=1.5) is None
    after = 1.5 + SHRINK_AFTER_S
    assert arena.run_options(ARENA_KEEP_BATCH, now=after) is options  # the first ordinary batch after it: shrink
    assert arena.run_options(1, now=after + 5) is None  # once
    assert arena.run_options(ARENA_KEEP_BATCH + 1, now=after + 6) is None and arena.grown_at == after + 6


def test_the_local_models_rule_carries_the_shrink_option():
    key, value = local_model.SHRINK_ARENA
    assert local_model.arena_shrink().options.get_run_config_entry(key) == value
