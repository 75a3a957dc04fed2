"""Both model backends implement the one ModelBackend protocol the pipeline and the explainer call: the same
methods, async where the protocol is, with the same parameters."""

import inspect

import pytest

pytest.importorskip("tritonclient")

from braintumor.serving.backend import ModelBackend, chunks  # noqa: E402
from braintumor.serving.local_model import LocalModel  # noqa: E402
from braintumor.serving.triton_client import TritonModel  # noqa: E402

MEMBERS = [name for name in vars(ModelBackend) if not name.startswith("_") and callable(getattr(ModelBackend, name))]


def test_the_protocol_lists_what_the_pipeline_calls():
    assert sorted(MEMBERS) == ["classify", "close", "forget_info", "infer", "info", "ready"]


@pytest.mark.parametrize("backend", [TritonModel, LocalModel])
@pytest.mark.parametrize("name", MEMBERS)
def test_backend_implements_the_protocol(backend, name):
    want, got = getattr(ModelBackend, name), getattr(backend, name)
    assert inspect.iscoroutinefunction(got) == inspect.iscoroutinefunction(want), name
    assert list(inspect.signature(got).parameters) == list(inspect.signature(want).parameters), name


def test_a_triton_model_is_a_model_backend_without_connecting():
    assert isinstance(TritonModel("127.0.0.1:1", "braintumor"), ModelBackend)


def test_chunks_split_without_copies():
    import numpy as np

    images = np.arange(10)
    parts = list(chunks(images, 4))
    assert [len(p) for p in parts] == [4, 4, 2] and all(np.shares_memory(p, images) for p in parts)
