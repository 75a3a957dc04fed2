"""The release model shipped in model_repository/ (what `braintumor serve` serves by default), not a toy one:
manifest intact, the served version is the card's, calibration and OOD constants agree everywhere, fp16 parity as
recorded at export within the tolerances stated here and re-run on the shipped graphs where a reference exists (the
card's PyTorch OOD scores of the probe set; the classifier graph against the full one), the OOD probe set is referred
through ONNX Runtime and the serving postprocess at the card's rate, and the artifacts stay small."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from braintumor.export.contract import (
    CAM, CLASS_PROBS, CONFIG_FILE, DEFAULT_NAME, FULL_OUTPUTS, INPUT_NAME, LAYOUTS, MASK_PROB, METADATA_FILE, ONNX_FILE,
    OOD_SCORE, PARAM_CAM_SIZE, PARAM_DISAGREE_MIN_AREA, PARAM_OOD_THRESHOLD, PARAM_REFER_THRESHOLD, PARAM_TEMPERATURE,
    classifier_name,
)
from braintumor.export.triton_config import latest_version
from braintumor.export.manifest import verify_manifest
from braintumor.export.triton_config import layout_configs, layout_file

ROOT = Path(__file__).resolve().parents[2]
REPOSITORY = ROOT / "model_repository"
CARD = json.loads((ROOT / "MODEL_CARD.json").read_text())
# fp16-stored weights vs PyTorch fp32, per output, as max absolute error: written here, not imported, so a change of
# the exporter's tolerances cannot quietly loosen what the shipped model is held to.
FP16_MAX_ABS = {CLASS_PROBS: 5e-3, MASK_PROB: 1e-2, CAM: 1e-1}
# ood_score is a squared distance in the thousands: held to a relative bound (measured 6.8e-4 at export).
FP16_MAX_REL = {OOD_SCORE: 2e-2}
# The card's probe detection rate may drop by at most this much through the shipped fp16 graph.
PROBE_MARGIN = 0.05
MAX_REPOSITORY_MB = 60


def _params(model: str) -> dict[str, str]:
    text = (REPOSITORY / model / CONFIG_FILE).read_text()
    return dict(re.findall(r'parameters \{ key: "(\w+)" value \{ string_value: "((?:[^"\\]|\\.)*)" \} \}', text))


@pytest.mark.parametrize("model", [DEFAULT_NAME, classifier_name(DEFAULT_NAME)])
def test_every_layout_config_is_what_the_exporter_writes_from_the_metadata(model):
    """config.pbtxt and configs/throughput.pbtxt are the generator's output for the shipped version's metadata.json:
    no hand edit, and the two layouts cannot drift apart."""
    on_disk = {layout: (REPOSITORY / model / layout_file(layout)).read_text() for layout in LAYOUTS}
    assert on_disk == layout_configs(REPOSITORY / model)


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
    assert float(params[PARAM_OOD_THRESHOLD]) == meta["ood_threshold"] == CARD["metrics"]["ood"]["threshold"]
    assert [o["name"] for o in meta["outputs"]] == list(FULL_OUTPUTS)
    assert int(params[PARAM_CAM_SIZE]) == meta["cam_size"] == meta["image_size"] // CARD["info"]["model_config"]["cam_stride"]
    assert meta["cam_size"] >= 12, "Grad-CAM must come from a map of at least 12x12 cells"
    assert meta["init_weights"] == CARD["info"]["init_weights"]


@pytest.mark.parametrize("model", [DEFAULT_NAME, classifier_name(DEFAULT_NAME)])
def test_fp16_parity_recorded_at_export_is_within_the_stated_tolerances(model):
    """The numbers the exporter measured against the fp32 PyTorch checkpoint (not shipped); mask_prob and cam have no
    other reference. The probe tests below re-run what can be re-run on the shipped files."""
    meta = json.loads((latest_version(REPOSITORY / model) / METADATA_FILE).read_text())
    assert meta["weights_storage"] == "float16"
    measured = {p["name"]: p for p in meta["parity"]["onnxruntime_vs_pytorch"]}
    assert measured and set(measured) <= set(FP16_MAX_ABS) | set(FP16_MAX_REL)
    for name, p in measured.items():
        if name in FP16_MAX_REL:
            assert p["max_rel"] <= FP16_MAX_REL[name], f"{model} {name}: {p['max_rel']} > {FP16_MAX_REL[name]}"
        else:
            assert p["max_abs"] <= FP16_MAX_ABS[name], f"{model} {name}: {p['max_abs']} > {FP16_MAX_ABS[name]}"
    # ... and the fp32-weight graph was proven first at the tight tolerance (relative for the score in the thousands)
    for p in meta["parity"]["onnxruntime_fp32_weights_vs_pytorch"]:
        assert (p["max_rel"] <= 1e-3) if p["name"] in FP16_MAX_REL else (p["max_abs"] <= 1e-4), p


def test_bundled_artifacts_stay_small():
    size = sum(p.stat().st_size for p in REPOSITORY.rglob("*") if p.is_file())
    assert size <= MAX_REPOSITORY_MB * 1e6, f"model_repository/ is {size / 1e6:.1f} MB"


@pytest.fixture(scope="module")
def probe_runs():
    """Each probe image through both shipped graphs once: {name: (pixels, geometry, full outputs, classifier
    outputs)}."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("skimage", reason="the probe set's photos come with scikit-image (the dev extra)")
    from braintumor.train.ood_probe import probe_images
    from braintumor.train.preprocess import PreprocessConfig, preprocess

    folder = latest_version(REPOSITORY / DEFAULT_NAME)
    cfg = PreprocessConfig.from_dict(json.loads((folder / METADATA_FILE).read_text())["preprocess"])
    full = ort.InferenceSession(str(folder / ONNX_FILE), providers=["CPUExecutionProvider"])
    classifier = ort.InferenceSession(str(latest_version(REPOSITORY / classifier_name(DEFAULT_NAME)) / ONNX_FILE),
                                      providers=["CPUExecutionProvider"])
    runs = {}
    for name, pixels in probe_images().items():
        image, geometry = preprocess(pixels, cfg)
        outputs = dict(zip(FULL_OUTPUTS, full.run(list(FULL_OUTPUTS), {INPUT_NAME: image[None, None]})))
        names = [o.name for o in classifier.get_outputs()]
        classified = dict(zip(names, classifier.run(names, {INPUT_NAME: image[None, None]})))
        runs[name] = (pixels, geometry, outputs, classified)
    return runs


def test_shipped_graph_gives_the_cards_pytorch_ood_scores(probe_runs):
    """Parity re-run on the shipped fp16-stored graph: the card recorded each probe's OOD score as the fp32 PyTorch
    model computed it; ONNX Runtime on model.onnx must give the same within the fp16 relative bound (measured max
    2.7e-3 over the 36 probes)."""
    probes = CARD["metrics"]["ood"]["probes"]
    assert set(probes) == set(probe_runs)
    rel = {name: abs(float(outputs[OOD_SCORE][0, 0]) - probes[name]["score"]) / probes[name]["score"]
           for name, (_, _, outputs, _) in probe_runs.items()}
    assert max(rel.values()) <= FP16_MAX_REL[OOD_SCORE], {n: r for n, r in rel.items() if r > FP16_MAX_REL[OOD_SCORE]}


def test_classifier_graph_answers_as_the_full_graph(probe_runs):
    """The classifier-only graph (LIME and SHAP query it) is the same model: its outputs equal the full graph's."""
    import numpy as np

    for name, (_, _, outputs, classifier) in probe_runs.items():
        assert classifier and set(classifier) <= set(FULL_OUTPUTS), classifier.keys()
        for output, value in classifier.items():
            np.testing.assert_allclose(value, outputs[output], rtol=1e-5, atol=1e-6, err_msg=f"{name} {output}")


def test_probe_set_is_referred_out_of_distribution_through_onnxruntime(probe_runs):
    """Every probe through the shipped graph and the serving postprocess: the learned score detects at least the card's
    rate less a margin, and noise and blanks are referred with an out_of_distribution: reason."""
    import numpy as np

    from braintumor.serving.postprocess import postprocess
    from braintumor.train.refer import ReferRules
    from braintumor.train.decode import DecodedImage
    from braintumor.train.ood_probe import probe_kind

    meta = json.loads((latest_version(REPOSITORY / DEFAULT_NAME) / METADATA_FILE).read_text())
    detected, reasons = {}, {}
    for name, (pixels, geometry, outputs, _) in probe_runs.items():
        detected[name] = float(outputs[OOD_SCORE][0, 0]) > meta["ood_threshold"]
        result = postprocess(outputs, geometry, DecodedImage(pixels, "L", False), classes=meta["classes"],
                             rules=ReferRules(meta["refer_threshold"], meta["disagree_min_area"],
                                              meta["ood_threshold"]))
        reasons[name] = [r for r in result.refer_reason if r.startswith("out_of_distribution:")]
        assert bool(reasons[name]) == detected[name] and (result.refer or not detected[name]), name
    card = CARD["metrics"]["ood"]
    rate = float(np.mean(list(detected.values())))
    assert len(detected) == card["probe_detection_rate"]["n"]
    assert rate >= card["probe_detection_rate"]["value"] - PROBE_MARGIN, {n: d for n, d in detected.items() if not d}
    for name in detected:
        if probe_kind(name) in ("noise", "blank"):
            assert reasons[name], f"{name} was not referred as out of distribution"


def test_ood_constants_stay_float32_in_the_fp16_stored_graph():
    """fp16 weight storage rewrites initializers; the OOD means and whitening are Constant nodes and must stay fp32."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto

    model = onnx.load(str(latest_version(REPOSITORY / DEFAULT_NAME) / ONNX_FILE))
    constants = [a.t for n in model.graph.node if n.op_type == "Constant" and n.name.startswith("/ood/")
                 for a in n.attribute if a.name == "value" and len(a.t.dims) >= 2]
    meta = json.loads((latest_version(REPOSITORY / DEFAULT_NAME) / METADATA_FILE).read_text())
    width = meta["calibration"]["ood"]["feature_dim"]
    shapes = sorted(tuple(d for d in t.dims if d != 1) for t in constants)  # the means come as (1, C, K)
    assert shapes == sorted([(len(meta["classes"]), width), (width, width)])
    assert all(t.data_type == TensorProto.FLOAT for t in constants)


@pytest.mark.slow
@pytest.mark.integration
def test_shipped_graph_reproduces_the_cards_validation_numbers(real_data, tmp_path):
    """Parity re-run on the whole validation split (750 slices, ~70 s on 2 cores): ONNX Runtime on the shipped
    fp16-stored graph gives the numbers the card measured with the fp32 PyTorch checkpoint (class probabilities
    through accuracy, calibration and referrals, masks through Dice, the OOD score through its referrals and maximum).
    Measured: the same 740 of 750 correct, 6 referred, 3 out of distribution; ECE 1e-6, Dice 5e-5, max OOD score 2e-4
    (relative) from the card's."""
    pytest.importorskip("onnxruntime")
    from braintumor.export.evaluate import evaluate_repository

    got = evaluate_repository(REPOSITORY, real_data, "val", tmp_path / "eval", progress=False)
    card = CARD["metrics"]
    n = card["n"]
    assert got["n"] == n
    # a slice whose top two classes are within the fp16 rounding may flip: one, not more
    assert abs(round(got["accuracy"] * n) - round(card["classification"]["accuracy"]["value"] * n)) <= 1
    assert abs(got["refer_policies"]["threshold"]["n_referred"] - card["refer"]["n_referred"]) <= 1
    assert abs(got["ood"]["n_referred"] - card["ood"]["n_val_referred"]) <= 1
    assert got["ece"] == pytest.approx(card["classification"]["ece"]["value"], abs=1e-3)
    assert got["dice"] == pytest.approx(card["segmentation"]["dice"]["value"], abs=5e-3)
    assert float(got["ood"]["max_score"]) == pytest.approx(card["ood"]["val_score_quantiles"]["max"],
                                                           rel=FP16_MAX_REL[OOD_SCORE])
