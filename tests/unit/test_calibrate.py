import json

import numpy as np
import pytest

from braintumor.train.calibrate import calibrate_checkpoint, refer_threshold
from braintumor.train.config import resolve_config
from braintumor.train.run import run_training
from braintumor.train.trainer.checkpoint import load_checkpoint


@pytest.mark.parametrize(
    "confidence, correct, target, expected",
    [
        ([0.9, 0.8, 0.7, 0.6], [1, 1, 0, 1], 0.99, 0.8),  # accepting 0.7 would drop accuracy to 2/3
        ([0.9, 0.8, 0.7, 0.6], [1, 1, 1, 1], 0.99, 0.6),  # all right: accept everything
        ([0.9, 0.8, 0.7, 0.6], [1, 1, 0, 1], 0.75, 0.6),  # 3/4 accepted right is enough
        ([0.9, 0.9, 0.5], [1, 0, 1], 0.99, 1.0),  # the tie at 0.9 cannot be split: refer everything
    ],
)
def test_refer_threshold(confidence, correct, target, expected):
    t = refer_threshold(np.array(confidence), np.array(correct), target)
    assert t == pytest.approx(expected)


def test_calibrate_writes_temperature_and_threshold(tmp_path):
    from braintumor.train.synthetic import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "data", n_per_class=8, size=(40, 36))
    cfg = resolve_config(None, {"model.encoder": "test_resnet", "data.image_size": 32, "optim.batch_size": 8,
                                "optim.epochs": 1, "runtime.progress": False, "data.cache_dir": str(tmp_path / "c")})
    best = run_training(cfg, data, tmp_path / "run")
    summary = calibrate_checkpoint(best, data, tmp_path / "run" / "calibrated.pt", progress=False)
    state = load_checkpoint(tmp_path / "run" / "calibrated.pt")
    assert state["temperature"] == pytest.approx(summary["temperature"]) and state["temperature"] > 0
    assert state["refer_threshold"] == summary["refer_threshold"]
    assert summary["ece_after"] <= summary["ece_before"] + 1e-9  # T is fitted by NLL, so ECE rarely rises
    assert 0 <= summary["refer_rate"] <= 1
    assert json.loads((tmp_path / "run" / "calibration.json").read_text())["n"] == summary["n"]
    assert load_checkpoint(best).get("temperature") == 1.0  # the original stays untouched
