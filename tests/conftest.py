from pathlib import Path

import pytest

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "brisc2025"


@pytest.fixture
def real_data() -> Path:
    if not (REAL_DATA / "classification_task").is_dir():
        pytest.skip(f"real BRISC 2025 data not found at {REAL_DATA}")
    return REAL_DATA


@pytest.fixture
def synthetic_root(tmp_path: Path) -> Path:
    from braintumor.train.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path / "data", n_per_class=4, size=(72, 64))


# -- serving fixtures: one tiny exported model and one embedded Triton per test session --------------------------
TINY_SIZE = 32
TINY_TRAIN = {"model.encoder": "test_resnet", "data.image_size": TINY_SIZE, "optim.batch_size": 8, "optim.epochs": 1,
              "runtime.progress": False}


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory) -> Path:
    """A Triton model repository (version 1, python backend) exported from a 1-epoch test_resnet on synthetic data."""
    pytest.importorskip("torch", reason="building the tiny model needs the train extra")
    from braintumor.export.repository import ExportOptions, export_repository
    from braintumor.train.config import resolve_config
    from braintumor.train.run import run_training
    from braintumor.train.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("tiny_model")
    data = make_synthetic_dataset(root / "data", n_per_class=4, size=(40, 36))
    cfg = resolve_config(None, {**TINY_TRAIN, "data.cache_dir": str(root / "cache")})
    checkpoint = run_training(cfg, data, root / "run")
    export_repository(checkpoint, root / "repo", ExportOptions(parity_data=data, parity_count=4))
    return root / "repo"


@pytest.fixture(scope="session")
def tiny_triton(tiny_repository):
    """A running embedded Triton serving :func:`tiny_repository` on free ports (stopped at session end)."""
    pytest.importorskip("pytriton", reason="the embedded Triton needs the nvidia-pytriton wheel")
    from braintumor.serving.triton_embedded import EmbeddedTriton, free_port

    triton = EmbeddedTriton(tiny_repository, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                            address="127.0.0.1", startup_timeout=120)
    triton.start()
    try:
        yield triton
    finally:
        triton.stop()


@pytest.fixture(scope="session")
def slice_jpeg() -> bytes:
    """One synthetic slice (a bright ellipse 'head' with a brighter blob) as JPEG bytes; not real data."""
    import io

    import numpy as np
    from PIL import Image

    yy, xx = np.mgrid[0:64, 0:56]
    head = (((yy - 32) / 28.0) ** 2 + ((xx - 28) / 24.0) ** 2) <= 1.0
    blob = (((yy - 26) / 6.0) ** 2 + ((xx - 33) / 5.0) ** 2) <= 1.0
    pixels = np.where(head, 90, 0) + np.where(blob, 110, 0)
    pixels = (pixels + np.random.default_rng(0).integers(0, 12, pixels.shape)).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def pytest_collection_finish(session):
    """Importing locust gevent-patches the interpreter and deadlocks every later in-process gRPC test; locust may run
    only in subprocesses. Fail fast if a test module imported it."""
    import sys

    if "locust" in sys.modules:
        raise pytest.UsageError("a test module imported locust into the pytest process (it monkey-patches it with "
                                "gevent); check availability with importlib.util.find_spec instead")
