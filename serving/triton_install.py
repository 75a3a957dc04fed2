"""Where the embedded Triton comes from: the ``tritonserver`` binary, its python backend and the stub for this
interpreter inside the installed nvidia-pytriton wheel, the backend directory assembled from them, and the process
environment they need."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

WHEEL = "nvidia-pytriton"
STUB_NAME = "triton_python_backend_stub"
BACKEND_LIB = "libtriton_python.so"
BACKEND_UTILS = "triton_python_backend_utils.py"
CACHE_ENV = "BRAINTUMOR_CACHE"  # where the assembled backend directory is kept (default ~/.cache/braintumor)

class TritonServerError(RuntimeError):
    """tritonserver cannot run here, exited early, was not ready in time, or died; the message says why (with the
    server's last log lines when it ran)."""


@dataclass(frozen=True)
class TritonInstall:
    """Where the pieces of tritonserver sit inside the installed nvidia-pytriton wheel."""

    version: str
    root: Path  # .../site-packages/pytriton/tritonserver

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def python_backend(self) -> Path:
        return self.root / "backends" / "python"

    @property
    def stubs(self) -> Path:
        return self.root / "python_backend_stubs"

    @property
    def libs(self) -> Path:
        # auditwheel's folder of vendored shared libraries, next to the package in site-packages
        return self.root.parent.parent / "nvidia_pytriton.libs"

    def stub(self, python: tuple[int, int] = sys.version_info[:2]) -> Path:
        path = self.stubs / f"{python[0]}.{python[1]}" / STUB_NAME
        if not path.is_file():
            have = sorted(p.name for p in self.stubs.iterdir() if (p / STUB_NAME).is_file()) if self.stubs.is_dir() else []
            raise TritonServerError(f"{WHEEL} {self.version} has no python backend stub for Python "
                                   f"{python[0]}.{python[1]} (it has {', '.join(have) or 'none'}); "
                                   "run braintumor under one of those Python versions")
        return path


def find_triton() -> TritonInstall:
    """Locate tritonserver in the installed nvidia-pytriton wheel, without importing pytriton (it is heavy)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonServerError(f"tritonserver comes from the {WHEEL} wheel, which is not installed: "
                               f"pip install {WHEEL} (Linux x86_64, Python 3.8-3.13)")
    install = TritonInstall(importlib.metadata.version(WHEEL), Path(list(spec.submodule_search_locations)[0]) / "tritonserver")
    for path in (install.binary, install.python_backend / BACKEND_LIB, install.libs):
        if not path.exists():
            raise TritonServerError(f"{path} is missing: the {WHEEL} {install.version} install is incomplete or "
                                   f"its layout changed; reinstall it (pip install --force-reinstall {WHEEL})")
    return install


def check_numpy() -> None:
    """The wheel's python stub is built against numpy 1.x; under numpy 2 ``as_numpy()`` reads wrong data silently
    (checked: an FP32 input [1, 2, 3] arrived as [1, 1, 1]). Refuse to start rather than serve wrong answers."""
    try:
        version = importlib.metadata.version("numpy")
    except importlib.metadata.PackageNotFoundError:
        raise TritonServerError("numpy is not installed; the python backend needs numpy<2") from None
    if int(version.split(".")[0]) >= 2:
        raise TritonServerError(f"numpy {version} is installed, but the python backend stub of {WHEEL} is built "
                               "for numpy 1.x and corrupts tensors under numpy 2: pip install 'numpy<2'")


def default_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "braintumor"


def assemble_backend_dir(install: TritonInstall, cache_dir: Path | None = None,
                         python: tuple[int, int] = sys.version_info[:2]) -> Path:
    """A ``--backend-directory`` holding ``python/`` = the wheel's python backend + the stub for ``python``.

    The wheel keeps the stubs apart from the backend; Triton looks for the stub next to libtriton_python.so.
    Built once per wheel version and Python version, atomically (a rename), so concurrent starts are safe.
    """
    stub = install.stub(python)
    root = (cache_dir or default_cache_dir()) / "triton-backends" / f"{WHEEL}-{install.version}-py{python[0]}.{python[1]}"
    sources = {BACKEND_LIB: install.python_backend / BACKEND_LIB,
               BACKEND_UTILS: install.python_backend / BACKEND_UTILS,
               STUB_NAME: stub}
    target = root / "python"
    if target.is_dir() and all((target / n).is_file() and (target / n).stat().st_size == s.stat().st_size
                               for n, s in sources.items()):
        return root
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".python-", dir=root))
    try:
        for name, source in sources.items():
            shutil.copy2(source, staging / name)
        (staging / STUB_NAME).chmod(0o755)
        staging.chmod(0o755)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except FileExistsError:  # another process won the race; its copy is identical
        pass
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return root


def build_env(install: TritonInstall, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of tritonserver and its python stubs.

    - LD_LIBRARY_PATH: the wheel's vendored libraries, then this interpreter's libpython directory; without the
      latter the stub may load the system's libpython of the same name and die in ``threading``
      (``'_thread.RLock' object has no attribute '_recursion_count'``).
    - PATH: this interpreter's bin directory first. The stub embeds Python and ignores PYTHONPATH; it finds
      ``python3`` on PATH to set ``sys.executable``, so a venv's python there gives the stub the venv's
      site-packages (numpy, onnxruntime, an editable braintumor) through its pyvenv.cfg.
    """
    env = dict(os.environ if base is None else base)

    def prepend(key: str, *paths: str) -> None:
        parts = [p for p in paths if p] + [p for p in env.get(key, "").split(os.pathsep) if p and p not in paths]
        env[key] = os.pathsep.join(parts)

    prepend("LD_LIBRARY_PATH", str(install.libs), sysconfig.get_config_var("LIBDIR") or "")
    prepend("PATH", str(Path(sys.executable).parent))
    env.pop("PYTHONHOME", None)  # would point the embedded interpreter at another installation
    return env
