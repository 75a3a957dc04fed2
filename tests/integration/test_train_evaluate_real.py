"""A few training steps on a 64-slice stratified slice of the real BRISC 2025 train split, then `evaluate`."""

import json

import pytest

from braintumor.serving.cli import main

pytestmark = pytest.mark.integration


def test_train_then_evaluate_writes_a_complete_report(real_data, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", "--data", str(real_data), "--out", str(run), "--image-size", "64", "--epochs", "1",
                 "--batch-size", "16", "--limit", "64", "--encoder", "resnet18", "--cache-dir", str(tmp_path / "cache"),
                 "--no-progress"])
    assert code == 0
    assert {"last.pt", "best.pt", "config.yaml", "history.csv", "val_split.csv"} <= {p.name for p in run.iterdir()}

    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(run / "best.pt"), "--data", str(real_data), "--split", "val",
                 "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("accuracy", "macro_f1", "roc_auc_ovr", "per_class", "dice", "iou", "ece"):
        assert key in metrics, key
    assert metrics["n"] == 10 and set(metrics["per_class"]) == {"glioma", "meningioma", "pituitary", "no_tumor"}
    html = (out / "report.html").read_text()
    for section in ("Confusion matrix", "ROC", "Reliability", "Dice"):
        assert section.lower() in html.lower(), section
    assert html.count("data:image/png;base64") >= 6

    # The official test split is not in the shared data: a clear error, not a crash.
    assert main(["evaluate", "--checkpoint", str(run / "best.pt"), "--data", str(real_data), "--split", "test",
                 "--out", str(out)]) == 2
    assert "no official test split" in capsys.readouterr().err
