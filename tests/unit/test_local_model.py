"""The in-process backend (`--backend onnxruntime`): the bundled repository's real ONNX graphs behind TritonModel's
interface. Concurrent requests are batched and each gets its own rows back; the metadata is read from the same
config.pbtxt Triton reads; a repository it cannot serve is refused at load, naming the file; a failing or slow model
gives the serving errors Triton's failures give."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("tritonclient.grpc")

from braintumor.export.contract import (  # noqa: E402
    CLASS_PROBS, CONFIG_FILE, DEFAULT_NAME, INPUT_NAME, METADATA_FILE, ONNX_FILE, classifier_name,
)
from braintumor.export.triton_config import latest_version  # noqa: E402
from braintumor.serving.errors import BadInput, DeadlineExceeded, UpstreamError  # noqa: E402
from braintumor.serving.local_model import LocalModel, ModelLoadError, read_config  # noqa: E402
from braintumor.serving.pipeline import Pipeline  # noqa: E402
from braintumor.serving.settings import ServeSettings  # noqa: E402
from braintumor.serving.backend import ModelInfo  # noqa: E402

REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"
VERSION = latest_version(REPOSITORY / DEFAULT_NAME)


@pytest.fixture(scope="module")
def model() -> LocalModel:
    return LocalModel(REPOSITORY, DEFAULT_NAME)


def _images(n: int, seed: int = 0) -> np.ndarray:
    size = int(read_config(REPOSITORY / DEFAULT_NAME / CONFIG_FILE)["input"][0]["dims"][-1])
    return np.random.default_rng(seed).integers(0, 256, (n, 1, size, size), dtype=np.uint8)


def _spy_batches(batcher, monkeypatch, queued: int) -> list[int]:
    """Record the size of every batch the real session runs. The first batch waits (in its thread) until ``queued``
    requests are waiting behind it: they must then go in the next batches, whatever the machine's speed."""
    sizes: list[int] = []
    real = batcher.session
    first = threading.Lock()

    class Recording:
        def run(self, names, feeds, run_options=None):
            sizes.append(len(feeds[INPUT_NAME]))
            if first.acquire(blocking=False):
                deadline = time.monotonic() + 30
                while len(batcher._pending) < queued:
                    assert time.monotonic() < deadline, f"{len(batcher._pending)} of {queued} requests queued"
                    time.sleep(0.001)
            return real.run(names, feeds)

    monkeypatch.setattr(batcher, "session", Recording())
    return sizes


def test_metadata_is_read_from_the_config_triton_reads(model):
    info = asyncio.run(model.info())
    meta = __import__("json").loads((VERSION / METADATA_FILE).read_text())
    assert info.version == VERSION.name
    assert list(info.classes) == meta["classes"]
    assert info.preprocess.image_size == meta["preprocess"]["image_size"]
    assert info.refer_threshold == pytest.approx(meta["refer_threshold"])
    assert info.ood_threshold == pytest.approx(meta["ood_threshold"])
    assert info.disagree_min_area == pytest.approx(meta["disagree_min_area"])
    # exactly what ModelInfo makes of Triton's JSON config, field for field
    assert info == ModelInfo.from_config(read_config(REPOSITORY / DEFAULT_NAME / CONFIG_FILE), version=VERSION.name)
    assert asyncio.run(model.ready())


def test_concurrent_requests_are_batched_and_each_gets_its_own_rows(model, monkeypatch):
    images = _images(8)
    session = ort.InferenceSession(str(VERSION / ONNX_FILE), providers=["CPUExecutionProvider"])
    alone = [dict(zip(model._full.outputs, session.run(list(model._full.outputs), {INPUT_NAME: images[i:i + 1]})))
             for i in range(8)]
    sizes = _spy_batches(model._full, monkeypatch, queued=8 - model._full.instances)

    async def all_at_once():
        return await asyncio.gather(*(model.infer(images[i:i + 1]) for i in range(8)))

    results = asyncio.run(all_at_once())
    assert sum(sizes) == 8 and max(sizes) > 1, f"no batching: {sizes}"  # the first runs alone, the rest queue
    for mine, expected in zip(results, alone):
        assert set(mine) == set(expected)
        for name in expected:
            np.testing.assert_allclose(mine[name], expected[name], rtol=1e-4, atol=1e-4, err_msg=name)


def test_a_batch_never_exceeds_max_batch_size(model, monkeypatch):
    monkeypatch.setattr(model._full, "max_batch", 3)
    sizes = _spy_batches(model._full, monkeypatch, queued=5 - model._full.instances)

    async def many():
        return await asyncio.gather(*(model.infer(_images(2, seed=k)) for k in range(4)),
                                    model.infer(_images(7, seed=9)))

    results = asyncio.run(many())
    assert max(sizes) <= 3 and sum(sizes) == 15 and sizes.count(3) >= 2, sizes
    assert [len(r[CLASS_PROBS]) for r in results] == [2, 2, 2, 2, 7]  # the 7 were sent as chunks of 3, 3, 1


def test_classify_uses_the_classifier_twin_in_chunks(model):
    images = _images(5)
    probs = asyncio.run(model.classify(images, batch_size=2))
    session = ort.InferenceSession(str(REPOSITORY / classifier_name(DEFAULT_NAME) / VERSION.name / ONNX_FILE),
                                   providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(probs, session.run([CLASS_PROBS], {INPUT_NAME: images})[0], rtol=1e-4, atol=1e-5)
    assert probs.shape == (5, 4)


def test_a_wrong_input_shape_is_bad_input(model):
    with pytest.raises(BadInput, match=r"\(N, 1, \d+, \d+\) uint8"):
        asyncio.run(model.infer(np.zeros((1, 1, 17, 17), np.uint8)))


def test_a_failing_run_fails_its_requests_and_the_model_keeps_serving(model, monkeypatch):
    real = model._full.session

    class Broken:
        def run(self, names, feeds, run_options=None):
            raise RuntimeError("out of memory")

    monkeypatch.setattr(model._full, "session", Broken())
    with pytest.raises(UpstreamError, match="out of memory"):
        asyncio.run(model.infer(_images(1)))
    monkeypatch.setattr(model._full, "session", real)
    assert asyncio.run(model.infer(_images(1)))[CLASS_PROBS].shape == (1, 4)


def test_a_model_slower_than_the_timeout_is_a_deadline_and_frees_its_place(model, monkeypatch):
    real = model._full.session.run
    release, finished = threading.Event(), threading.Event()

    class Slow:
        def run(self, names, feeds, run_options=None):
            release.wait(30)  # held until its caller has given up: slower than the timeout by construction
            try:
                return real(names, feeds)
            finally:
                finished.set()

    monkeypatch.setattr(model, "timeout_s", 0.1)
    monkeypatch.setattr(model._full, "session", Slow())

    async def give_up_then_finish() -> tuple[int, int]:
        with pytest.raises(DeadlineExceeded, match="within 0.1 s"):
            await model.infer(_images(1))
        held = model._full._running  # the abandoned batch still runs in its thread
        release.set()
        assert await asyncio.get_running_loop().run_in_executor(None, finished.wait, 30)
        await asyncio.gather(*model._full._tasks)  # the batch's task ends in this loop, not cancelled at its close
        return held, model._full._running

    assert asyncio.run(give_up_then_finish()) == (1, 0)


def test_throughput_layout_runs_two_instances_with_half_the_cores_each():
    import os

    model = LocalModel(REPOSITORY, DEFAULT_NAME, layout="throughput")
    assert model._full.instances == 2 and model._classifier.instances == 2
    cpus = len(os.sched_getaffinity(0))
    # the python backend's rule (intra_op_threads 0: the CPUs shared among the instances)
    assert model._full.session.get_session_options().intra_op_num_threads == max(1, cpus // 2)


@pytest.fixture
def copy_of_repository(tmp_path) -> Path:
    repo = tmp_path / "repo"
    shutil.copytree(REPOSITORY, repo, ignore=shutil.ignore_patterns("__pycache__"))
    return repo


def test_a_modified_artifact_is_refused_naming_the_file(copy_of_repository):
    with open(copy_of_repository / DEFAULT_NAME / VERSION.name / METADATA_FILE, "a") as fh:
        fh.write(" ")
    with pytest.raises(ModelLoadError, match=rf"unverified model: .*{METADATA_FILE}"):
        LocalModel.check(copy_of_repository, DEFAULT_NAME)
    with pytest.raises(ModelLoadError, match=METADATA_FILE):
        LocalModel(copy_of_repository, DEFAULT_NAME)


@pytest.mark.parametrize("damage, fragment", [
    ("no classifier", "brain_tumor_classifier: no such model"),
    ("plan only", "a TensorRT plan runs only in Triton"),
    ("no throughput config", "throughput layout's config is missing"),
    ("no version", "no numbered version folder"),
    ("bad config", "not a Triton model config"),
])
def test_a_repository_it_cannot_serve_is_refused_before_loading(copy_of_repository, damage, fragment):
    repo, layout = copy_of_repository, "latency"
    if damage == "no classifier":
        shutil.rmtree(repo / classifier_name(DEFAULT_NAME))
    elif damage == "plan only":
        (repo / DEFAULT_NAME / VERSION.name / ONNX_FILE).rename(repo / DEFAULT_NAME / VERSION.name / "model.plan")
    elif damage == "no throughput config":
        shutil.rmtree(repo / DEFAULT_NAME / "configs")
        layout = "throughput"
    elif damage == "no version":
        shutil.rmtree(repo / DEFAULT_NAME / VERSION.name)
    elif damage == "bad config":
        (repo / DEFAULT_NAME / CONFIG_FILE).write_text("name: brain_tumor\nthis is not protobuf text\n")
    with pytest.raises(ModelLoadError, match=fragment):
        LocalModel.check(repo, DEFAULT_NAME, layout=layout)


def test_check_names_the_version_it_would_serve():
    assert LocalModel.check(REPOSITORY, DEFAULT_NAME) == VERSION.name


def test_settings_choose_the_backend_and_refuse_what_cannot_run():
    pipeline = Pipeline.from_settings(ServeSettings(backend="onnxruntime", model_repository=str(REPOSITORY)))
    assert isinstance(pipeline.model, LocalModel)
    with pytest.raises(ValueError, match="BRAINTUMOR_BACKEND='local': use one of triton, onnxruntime"):
        ServeSettings.from_env({"BRAINTUMOR_BACKEND": "local"})
    with pytest.raises(ValueError, match="needs BRAINTUMOR_MODEL_REPOSITORY"):
        ServeSettings.from_env({"BRAINTUMOR_BACKEND": "onnxruntime"})
    with pytest.raises(ValueError, match="BRAINTUMOR_LAYOUT='fast'"):
        ServeSettings.from_env({"BRAINTUMOR_LAYOUT": "fast"})


@pytest.mark.parametrize("extra, fragment", [
    (["--triton-url", "127.0.0.1:1"], "--backend onnxruntime runs the model in the front doors instead"),
    (["--model-repository", "MISSING"], "MISSING/brain_tumor: no such model in the repository"),
])
def test_serve_refuses_an_onnxruntime_backend_it_cannot_start(extra, fragment, tmp_path, capsys):
    """Refused in the one `serve` process before any front door starts, as one line naming what to fix."""
    from braintumor.serving.cli import main
    from braintumor.serving.triton_embedded import free_port

    extra = [a.replace("MISSING", str(tmp_path / "missing")) for a in extra]
    assert main(["serve", "--backend", "onnxruntime", *extra, "--http-port", str(free_port()),
                 "--grpc-port", str(free_port()), "--grpc-metrics-port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert fragment.replace("MISSING", str(tmp_path / "missing")) in err and "Traceback" not in err
