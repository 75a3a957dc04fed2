"""The alternating trainer on synthetic slices with a tiny encoder: outputs, task order, bit-for-bit resume."""

import csv

import pytest
import torch

from braintumor.train.config import resolve_config
from braintumor.train.run import run_training
from braintumor.train.trainer.checkpoint import load_checkpoint, load_model

TINY = {"model.encoder": "test_resnet", "data.image_size": 32, "optim.batch_size": 8, "runtime.progress": False}


@pytest.fixture
def synthetic_root(tmp_path):
    from braintumor.train.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path / "data", n_per_class=8, size=(40, 36))


def _cfg(tmp_path, **overrides):
    return resolve_config(None, {**TINY, "data.cache_dir": str(tmp_path / "cache"), **overrides})


def test_run_writes_the_contracted_files(synthetic_root, tmp_path):
    best = run_training(_cfg(tmp_path, **{"optim.epochs": 1}), synthetic_root, tmp_path / "run")
    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"last.pt", "best.pt", "config.yaml", "history.csv", "val_split.csv"} <= names
    with open(tmp_path / "run" / "history.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["epoch"] for r in rows] == ["1"]
    assert {"train_cls_loss", "train_seg_loss", "val_accuracy", "val_dice", "val_score"} <= set(rows[0])
    model, state = load_model(best)
    assert state["preprocess"]["image_size"] == 32 and state["classes"][3] == "no_tumor"
    logits, masks = model(torch.zeros(2, 1, 32, 32))
    assert logits.shape == (2, 4) and masks.shape == (2, 1, 32, 32)


def test_mask_pool_and_cam_loss_run_and_are_rebuilt_from_the_checkpoint(synthetic_root, tmp_path):
    cfg = _cfg(tmp_path, **{"optim.epochs": 1, "model.class_pool": "mask", "model.class_pool_floor": 0.2,
                            "optim.lambda_cam": 0.5})
    best = run_training(cfg, synthetic_root, tmp_path / "run")
    with open(tmp_path / "run" / "history.csv") as fh:
        row = next(csv.DictReader(fh))
    assert 0 <= float(row["train_cam_loss"]) <= 1  # a share of the CAM's positive energy
    model, state = load_model(best)
    assert (state["model_config"]["class_pool"], state["model_config"]["class_pool_floor"]) == ("mask", 0.2)
    assert model.class_needs_mask and model.classification_head.pool_floor == 0.2


def test_segmentation_step_adds_the_weighted_cam_loss():
    from braintumor.train.factory import build_model
    from braintumor.train.losses import cam_outside_loss, segmentation_loss
    from braintumor.train.trainer.steps import SegmentationStep, TaskForward

    torch.manual_seed(0)
    model = build_model("test_resnet", preprocess={"image_size": 64}, cam_stride=16).eval()
    mask = torch.zeros(2, 1, 64, 64, dtype=torch.uint8)  # 4x4 CAM grid
    mask[0, :, 4:12, 4:12] = 1
    batch = {"image": torch.rand(2, 1, 64, 64) * 255, "mask": mask, "label": torch.tensor([1, 3])}
    net = TaskForward(model)
    plain, logs = SegmentationStep("seg", None, weight=0.3).loss(net, batch)
    assert "cam_loss" not in logs
    total, logs = SegmentationStep("seg", None, weight=0.3, cam_weight=2.0).loss(net, batch)
    with torch.no_grad():
        features = model.forward_features(batch["image"])
        seg = segmentation_loss(model.segment(features), mask.float())
        cam = cam_outside_loss(model.class_activation_maps(features), batch["label"], mask)
    assert logs["cam_loss"] == pytest.approx(cam.item()) and cam.item() > 0
    assert total.item() == pytest.approx(0.3 * seg.item() + 2.0 * cam.item(), rel=1e-5)
    assert plain.item() == pytest.approx(0.3 * seg.item(), rel=1e-5)


def test_existing_run_needs_resume(synthetic_root, tmp_path):
    cfg = _cfg(tmp_path, **{"optim.epochs": 1})
    run_training(cfg, synthetic_root, tmp_path / "run")
    with pytest.raises(FileExistsError, match="--resume"):
        run_training(cfg, synthetic_root, tmp_path / "run")


def _stop_after(epoch):
    def callback(trainer, done, logs):
        if done == epoch:
            raise KeyboardInterrupt  # as Ctrl-C right after the epoch's checkpoint
    return callback


def test_resume_is_bit_for_bit(synthetic_root, tmp_path):
    cfg = _cfg(tmp_path, **{"optim.epochs": 2})
    run_training(cfg, synthetic_root, tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, synthetic_root, tmp_path / "resumed", callbacks=[_stop_after(1)])
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["epoch"] == 1
    run_training(cfg, synthetic_root, tmp_path / "resumed", resume=True)

    a, b = (load_checkpoint(tmp_path / name / "last.pt") for name in ("straight", "resumed"))
    assert a["epoch"] == b["epoch"] == 2
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for k, v in a["optimizer"]["state"].items():
        assert torch.equal(v["exp_avg"], b["optimizer"]["state"][k]["exp_avg"])

    def losses(name):
        with open(tmp_path / name / "history.csv") as fh:
            return [(r["epoch"], r["train_cls_loss"], r["train_seg_loss"], r["val_score"]) for r in csv.DictReader(fh)]

    assert losses("straight") == losses("resumed") and len(losses("resumed")) == 2
