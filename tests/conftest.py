import os
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from braintumor.serving.supervisor import stop_group

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


@contextmanager
def _session_random_kept():
    """Training seeds Python's global ``random`` (runtime.seed 0); without this, every session that trains the tiny
    model draws the same "random" free ports afterwards (free_port samples with the global generator), and two
    sessions on one host collide on them ("Could not bind 127.0.0.1:30167", seen twice)."""
    import random

    state = random.getstate()
    try:
        yield
    finally:
        random.setstate(state)


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
    with _session_random_kept():
        checkpoint = run_training(cfg, data, root / "run")
    export_repository(checkpoint, root / "repo", ExportOptions(parity_data=data, parity_count=4))
    return root / "repo"


@pytest.fixture(scope="session")
def tiny_ood_checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint, data): a 1-epoch test_resnet on 6 synthetic slices per class with its OOD score fitted, so its full
    graph has ood_score as the release model's; trained once for test_export.py and the embedded Triton e2e tests.
    Read-only: a test that changes the checkpoint copies it first."""
    pytest.importorskip("torch", reason="building the tiny model needs the train extra")
    from braintumor.train.config import resolve_config
    from braintumor.train.ood import fit_ood_checkpoint
    from braintumor.train.run import run_training
    from braintumor.train.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("tiny_ood_run")
    data = make_synthetic_dataset(root / "data", n_per_class=6, size=(40, 36))
    cfg = resolve_config(None, {**TINY_TRAIN, "data.cache_dir": str(root / "cache")})
    with _session_random_kept():
        checkpoint = run_training(cfg, data, root / "run")
        fit_ood_checkpoint(checkpoint, data, progress=False)
    return checkpoint, data


@pytest.fixture(scope="session")
def tiny_ood_repository(tiny_ood_checkpoint, tmp_path_factory):
    """(repository, published): :func:`tiny_ood_checkpoint` exported (version 1, python backend, parity on 6 of its
    slices). Read-only: a test that breaks or adds a version works on a copy."""
    from braintumor.export.repository import ExportOptions, export_repository

    checkpoint, data = tiny_ood_checkpoint
    out = tmp_path_factory.mktemp("tiny_ood_repo")
    return out, export_repository(checkpoint, out, ExportOptions(parity_data=data, parity_count=6))


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


# -- the HTTP gateway as deployed: `bentoml serve` in its own process group --------------------------------------
GATEWAY_TARGET = "braintumor.serving.service:BrainTumorGateway"


@dataclass
class Gateway:
    url: str
    log: Path

    def post(self, path: str, **kw):
        import httpx

        return httpx.post(self.url + path, timeout=60, **kw)

    def get(self, path: str, **kw):
        import httpx

        return httpx.get(self.url + path, timeout=60, **kw)


@contextmanager
def _running_gateway(home: Path, triton, ready: bool = True, **env: str):
    """`bentoml serve` on a free port in its own process group; waits for /readyz (or /healthz), kills the group.
    ``triton``: a running EmbeddedTriton (its gRPC URL and the key its inference API needs) or a bare HOST:PORT."""
    import httpx

    from braintumor.serving.triton_embedded import free_port

    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = home / "gateway.log"
    # Own BENTOML_HOME: `bentoml serve` recreates the task database there, which another gateway may be using.
    triton_url, key = (triton, "") if isinstance(triton, str) else (triton.grpc_url, triton.client_key or "")
    env = {**os.environ, "BENTOML_HOME": str(home), "BRAINTUMOR_TRITON_URL": triton_url, "BRAINTUMOR_TRITON_KEY": key,
           **env}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", GATEWAY_TARGET, "--host", "127.0.0.1",
                                 "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    gateway = Gateway(f"http://127.0.0.1:{port}", log)
    try:
        probe = "/readyz" if ready else "/healthz"
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(gateway.url + probe, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"gateway did not answer {probe}:\n{log.read_text(errors='replace')[-4000:]}")
            time.sleep(0.2)
        yield gateway
    finally:
        stop_group(proc, 15, "gateway")


@pytest.fixture(scope="session")
def running_gateway():
    """``running_gateway(home, triton, ready=True, **env)``: a context manager yielding a :class:`Gateway`."""
    return _running_gateway


# -- patient data: one synthetic MR DICOM carrying PHI in its header, for the "no PHI anywhere" tests -----------------
PHI_FIELDS = {"PatientName": "Doe^Jane", "PatientID": "PID-98765", "PatientBirthDate": "19700101",
              "InstitutionName": "St Example Hospital", "ReferringPhysicianName": "House^Gregory",
              "AccessionNumber": "ACC-4242"}


@pytest.fixture(scope="session")
def phi() -> dict[str, str]:
    """The patient data written into ``phi_dicom``'s header."""
    return dict(PHI_FIELDS)


@pytest.fixture(scope="session")
def phi_dicom() -> bytes:
    """A valid MR slice with patient data in its header (synthetic pixels: an ellipse 'head' and a blob)."""
    pytest.importorskip("pydicom")
    import numpy as np

    from braintumor.train.synthetic import synthetic_dicom

    yy, xx = np.mgrid[0:64, 0:56]
    pixels = np.where((((yy - 32) / 28.0) ** 2 + ((xx - 28) / 24.0) ** 2) <= 1.0, 900, 0).astype(np.uint16)
    pixels[20:30, 25:35] = 1800
    return synthetic_dicom(pixels, 12, **PHI_FIELDS, PixelSpacing=[0.5, 0.5])


# -- dicom3tools' dciodvfy, the reference DICOM object validator (Debian's dicom3tools; .ci/run installs it) -----------
@pytest.fixture(scope="session")
def dciodvfy():
    """``dciodvfy(path) -> list[str]``: the validator's "Error" lines for one file (warnings are not errors)."""
    import shutil

    binary = shutil.which("dciodvfy")
    if binary is None:
        pytest.skip("dciodvfy not found: install Debian's dicom3tools (.ci/run does where apt-get and root are)")

    def errors(path) -> list[str]:
        out = subprocess.run([binary, str(path)], capture_output=True, text=True, timeout=60)
        return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]

    return errors


# -- the gRPC API in this process, and both front doors on the tiny model ---------------------------------------------
@contextmanager
def _grpc_in_thread(settings):
    """`serve_grpc` with ``settings`` in a thread with its own event loop (as `braintumor grpc-server` runs it), on a
    free loopback port; yields its HOST:PORT and stops it on exit."""
    import asyncio
    import threading

    from braintumor.serving.grpc_server import serve_grpc
    from braintumor.serving.triton_embedded import free_port

    port, ready, state = free_port(), threading.Event(), {}

    def run():
        async def main():
            state["loop"], state["stop"] = asyncio.get_running_loop(), asyncio.Event()
            await serve_grpc(settings, port, host="127.0.0.1", metrics_port=None, ready_event=ready,
                             stop_event=state["stop"], grace=1.0)

        try:
            asyncio.run(main())
        except BaseException as exc:  # noqa: BLE001 - reported below
            state["error"] = exc
            ready.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(30) and "error" not in state, f"gRPC server did not start: {state.get('error')!r}"
    try:
        yield f"127.0.0.1:{port}"
    finally:
        state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(30)


@pytest.fixture(scope="session")
def grpc_in_thread():
    """``grpc_in_thread(settings)``: a context manager yielding the HOST:PORT of an in-process gRPC API."""
    return _grpc_in_thread


@pytest.fixture(scope="session")
def front_doors(tiny_triton, tmp_path_factory):
    """{"grpc": HOST:PORT, "http": URL}: the gRPC API (in this process, its own thread and loop) and the HTTP gateway
    (`bentoml serve`) in front of :func:`tiny_triton`, with default settings; stopped at session end."""
    pytest.importorskip("tritonclient.grpc.aio")
    pytest.importorskip("bentoml")
    from braintumor.serving.settings import ServeSettings

    settings = ServeSettings(triton_url=tiny_triton.grpc_url, triton_key=tiny_triton.client_key)
    with _grpc_in_thread(settings) as target:
        with _running_gateway(tmp_path_factory.mktemp("front_doors_gateway"), tiny_triton) as gateway:
            yield {"grpc": target, "http": gateway.url}
