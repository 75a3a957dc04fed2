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
