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
