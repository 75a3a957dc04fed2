"""The ONNX Runtime arena rule exists twice (the python backend cannot import our package): the copies agree, and
the in-process backend asks for a shrink exactly after batches above the bound."""

import ast
from pathlib import Path

import pytest

from braintumor.export.repository import PYTHON_BACKEND_MODEL

ort = pytest.importorskip("onnxruntime")

from braintumor.serving import local_model  # noqa: E402


def _constants(path: Path) -> dict:
    tree = ast.parse(path.read_text())
    return {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
            and node.targets[0].id in ("ARENA_KEEP_BATCH", "SHRINK_ARENA")}


def test_the_python_backend_and_the_local_model_share_the_arena_rule():
    assert _constants(PYTHON_BACKEND_MODEL) == {"ARENA_KEEP_BATCH": local_model.ARENA_KEEP_BATCH,
                                                "SHRINK_ARENA": local_model.SHRINK_ARENA}


@pytest.mark.parametrize("batch, shrinks", [(1, False), (local_model.ARENA_KEEP_BATCH, False),
                                            (local_model.ARENA_KEEP_BATCH + 1, True), (32, True)])
def test_run_options_shrink_only_after_large_batches(batch, shrinks):
    options = local_model.run_options(batch)
    if not shrinks:
        assert options is None
    else:
        key, value = local_model.SHRINK_ARENA
        assert options.get_run_config_entry(key) == value
