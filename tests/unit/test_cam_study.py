"""The CAM study end to end on a tiny untrained model and synthetic slices, and its measures on hand-made maps."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from braintumor.serving.cli import main
from braintumor.train.cam_study import METHODS, SERVED, deletion_auc, deletion_probabilities, heat_order
from braintumor.train.factory import build_model
from braintumor.train.metrics import energy_in_mask
from braintumor.train.samples import build_index
from braintumor.train.trainer.checkpoint import save_checkpoint


@pytest.fixture
def checkpoint(synthetic_root, tmp_path):
    torch.manual_seed(0)
    model = build_model("test_resnet", preprocess={"image_size": 64}, cam_stride=16, class_pool="mask")
    with torch.no_grad():  # an untrained mask is ~0.5 everywhere, which pools like GAP: make it uneven
        model.segmentation_head.conv.weight.mul_(50)
    keys = sorted(s.key for s in build_index(synthetic_root).samples)
    path = tmp_path / "best.pt"
    save_checkpoint(path, model=model, run_config={}, epoch=1, extra={"val_keys": keys})
    return path


def test_cam_study_writes_and_prints_its_table(checkpoint, synthetic_root, tmp_path, capsys):
    out = tmp_path / "study"
    assert main(["cam-study", "--checkpoint", str(checkpoint), "--data", str(synthetic_root), "--out", str(out),
                 "--limit", "5", "--batch-size", "4", "--no-progress"]) == 0
    result = json.loads((out / "cam_study.json").read_text())
    layers = ["stride 8", "stride 16", "cam_layer (fused, stride 16)"]
    assert [(r["method"], r["layer"]) for r in result["rows"]] == (
        [(SERVED, "cam_layer")] + [(m, layer) for m in METHODS for layer in layers])
    assert result["n_tumour_slices"] == 5 and result["class_pool"] == "mask"
    for row in result["rows"]:
        assert row["n"] == 5 and 0 <= row["pointing_game"] <= 1 and 0 <= row["energy_in_mask"] <= 1
    deletion = result["deletion"]
    assert len(deletion["served_curve"]) == 11 and 0 <= deletion["served_auc"] <= 1 and 0 <= deletion["random_auc"] <= 1
    assert deletion["served_curve"][0] == pytest.approx(deletion["random_curve"][0])  # nothing deleted yet
    assert deletion["served_curve"][-1] == pytest.approx(deletion["random_curve"][-1])  # everything deleted
    assert deletion["least_first_curve"][0] == pytest.approx(deletion["served_curve"][0])
    assert deletion["least_first_curve"][-1] == pytest.approx(deletion["served_curve"][-1])
    assert 0 <= deletion["least_first_auc"] <= 1 and 0 <= deletion["served_below_least_first"] <= 1
    table = (out / "cam_study.md").read_text()
    assert "| method | layer | pointing game | energy in mask | n |" in table
    assert "| HiResCAM | stride 8 |" in table and table in capsys.readouterr().out
    # HiResCAM on the fused layer is the served CAM of a mask-pooled head (gradient w_hw W_c times activation):
    served, hires = result["rows"][0], next(r for r in result["rows"] if r["method"] == "HiResCAM" and r["layer"] == layers[2])
    assert hires["energy_in_mask"] == pytest.approx(served["energy_in_mask"], abs=0.02)


def test_energy_in_mask_by_hand():
    masks = np.zeros((3, 20, 20), np.uint8)
    masks[:2, 0:2, 0:2] = 1
    heat = np.zeros((3, 20, 20), np.float32)
    heat[:, 0, 0] = 3.0  # inside
    heat[:, 19, 19] = 1.0  # outside even after the 8-px dilation
    heat[:, 10, 0] = -5.0  # negative: not mass
    heat[1] = 0.0  # no positive mass: points nowhere
    got = energy_in_mask(heat, masks)
    assert got[0] == pytest.approx(0.75) and got[1] == 0.0 and np.isnan(got[2])


class _Brightness(torch.nn.Module):
    """A toy 'model' whose class-0 probability is the image's mean brightness / 255 (for deletion_probabilities)."""

    def forward_features(self, x):
        return [x]

    class_needs_mask = False

    def classify(self, features, mask_logits=None):
        p = features[0].mean(dim=(1, 2, 3)) / 255
        return torch.log(torch.stack([p, 1 - p], dim=1).clamp_min(1e-12))


def test_deletion_removes_the_hottest_pixels_first():
    images = np.zeros((1, 10, 10), np.uint8)
    images[0, :5] = 255  # the top half is bright: deleting it first drops the probability fastest
    heat = np.zeros((1, 10, 10), np.float32)
    heat[0, :5] = 1.0
    rng = np.random.default_rng(0)
    hot, cold = deletion_probabilities(_Brightness(), images, [heat_order(heat, rng), heat_order(1 - heat, rng)],
                                       np.array([0]), batch_size=8)
    np.testing.assert_allclose(hot[0], [0.5, 0.4, 0.3, 0.2, 0.1, 0, 0, 0, 0, 0, 0], atol=1e-6)
    np.testing.assert_allclose(cold[0], [0.5] * 6 + [0.4, 0.3, 0.2, 0.1, 0], atol=1e-6)
    assert deletion_auc(hot)[0] == pytest.approx(0.125) and deletion_auc(cold)[0] == pytest.approx(0.375)
