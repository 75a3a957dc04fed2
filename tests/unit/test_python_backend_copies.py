"""The committed model repository carries copies of the python-backend model (Triton loads each version's model.py);
they must be the file `braintumor export` copies, export/python_backend/model.py, byte for byte."""

from pathlib import Path

import pytest

from braintumor.export.contract import PYTHON_FILE
from braintumor.export.repository import PYTHON_BACKEND_MODEL

ROOT = Path(__file__).resolve().parents[2]
COPIES = sorted((ROOT / "model_repository").glob(f"*/*/{PYTHON_FILE}"))


def test_the_bundled_repository_has_python_backend_copies():
    assert COPIES, "model_repository/ holds no <model>/<version>/model.py"
    assert PYTHON_BACKEND_MODEL == ROOT / "export" / "python_backend" / PYTHON_FILE


@pytest.mark.parametrize("copy", COPIES, ids=[str(p.relative_to(ROOT)) for p in COPIES])
def test_bundled_python_backend_equals_the_exported_one(copy):
    assert copy.read_bytes() == PYTHON_BACKEND_MODEL.read_bytes(), (
        f"{copy.relative_to(ROOT)} differs from export/python_backend/model.py; re-export the release "
        "(`braintumor export`) or copy the file into every version")
