"""The release model shipped in model_repository/ (what `braintumor serve` serves by default), not a toy one:
manifest intact, the served version is the card's, calibration constants agree everywhere, fp16 parity as recorded
at export within the tolerances stated here, and the artifacts stay small."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from braintumor.export.contract import (
    CAM, CLASS_PROBS, CONFIG_FILE, DEFAULT_NAME, MASK_PROB, METADATA_FILE, PARAM_CAM_SIZE, PARAM_DISAGREE_MIN_AREA,
    PARAM_REFER_THRESHOLD, PARAM_TEMPERATURE, classifier_name,
)
from braintumor.export.evaluate import latest_version
from braintumor.export.manifest import verify_manifest

ROOT = Path(__file__).resolve().parents[2]
REPOSITORY = ROOT / "model_repository"
CARD = json.loads((ROOT / "MODEL_CARD.json").read_text())
# fp16-stored weights vs PyTorch fp32, per output, as max absolute error: written here, not imported, so a change of
# the exporter's tolerances cannot quietly loosen what the shipped model is held to.
FP16_MAX_ABS = {CLASS_PROBS: 5e-3, MASK_PROB: 1e-2, CAM: 1e-1}
MAX_REPOSITORY_MB = 60


def _params(model: str) -> dict[str, str]:
    text = (REPOSITORY / model / CONFIG_FILE).read_text()
    return dict(re.findall(r'parameters \{ key: "(\w+)" value \{ string_value: "((?:[^"\\]|\\.)*)" \} \}', text))


@pytest.mark.parametrize("model", [DEFAULT_NAME, classifier_name(DEFAULT_NAME)])
def test_manifest_verifies_and_served_version_is_the_cards(model):
    folder = latest_version(REPOSITORY / model)
    verify_manifest(folder)  # sha256 of every artifact; raises naming the file that changed
    assert int(folder.name) == CARD["info"]["version"]
    assert "latest: { num_versions: 1 }" in (REPOSITORY / model / CONFIG_FILE).read_text()


def test_calibration_constants_agree_between_metadata_config_and_card():
    folder = latest_version(REPOSITORY / DEFAULT_NAME)
    meta = json.loads((folder / METADATA_FILE).read_text())
    params = _params(DEFAULT_NAME)
    calibration = CARD["metrics"]["calibration"]
    assert float(params[PARAM_TEMPERATURE]) == meta["temperature"] == pytest.approx(calibration["temperature"])
    assert float(params[PARAM_REFER_THRESHOLD]) == meta["refer_threshold"] == calibration["refer_threshold"]
    assert float(params[PARAM_DISAGREE_MIN_AREA]) == meta["disagree_min_area"] == calibration["disagree_min_area"]
    assert int(params[PARAM_CAM_SIZE]) == meta["cam_size"] == meta["image_size"] // CARD["info"]["model_config"]["cam_stride"]
    assert meta["cam_size"] >= 12, "Grad-CAM must come from a map of at least 12x12 cells"
    assert meta["init_weights"] == CARD["info"]["init_weights"]


@pytest.mark.parametrize("model", [DEFAULT_NAME, classifier_name(DEFAULT_NAME)])
def test_fp16_parity_recorded_at_export_is_within_the_stated_tolerances(model):
    meta = json.loads((latest_version(REPOSITORY / model) / METADATA_FILE).read_text())
    assert meta["weights_storage"] == "float16"
    measured = {p["name"]: p["max_abs"] for p in meta["parity"]["onnxruntime_vs_pytorch"]}
    assert measured and set(measured) <= set(FP16_MAX_ABS)
    for name, max_abs in measured.items():
        assert max_abs <= FP16_MAX_ABS[name], f"{model} {name}: {max_abs} > {FP16_MAX_ABS[name]}"
    # ... and the fp32-weight graph was proven first at the tight tolerance
    assert all(p["max_abs"] <= 1e-4 for p in meta["parity"]["onnxruntime_fp32_weights_vs_pytorch"])


def test_bundled_artifacts_stay_small():
    size = sum(p.stat().st_size for p in REPOSITORY.rglob("*") if p.is_file())
    assert size <= MAX_REPOSITORY_MB * 1e6, f"model_repository/ is {size / 1e6:.1f} MB"
