from pathlib import Path

import pytest
from pydantic import ValidationError

from braintumor.train.config import resolve_config, save_config


def test_defaults_yaml_and_flags_layer(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("optim:\n  epochs: 7\n  lr: 0.001\nmodel:\n  encoder: resnet34\n")
    cfg = resolve_config(yaml_file, {"optim.epochs": 3, "data.limit": None})
    assert (cfg.optim.epochs, cfg.optim.lr, cfg.model.encoder) == (3, 0.001, "resnet34")
    assert cfg.data.image_size == 128 and cfg.optim.seg_every == 2 and cfg.optim.lambda_seg == 0.3
    assert (cfg.model.class_pool, cfg.model.class_pool_floor, cfg.optim.lambda_cam) == ("mean", 0.1, 0.0)


def test_resolved_config_round_trips(tmp_path):
    cfg = resolve_config(None, {"data.image_size": 64, "model.pretrained": "/weights/r18.pth"})
    save_config(cfg, tmp_path / "config.yaml")
    assert resolve_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize("override", [{"optim.epochs": 0}, {"data.geometry": "stretch"}, {"optim.typo_key": 1},
                                      {"model.class_pool": "max"}, {"model.class_pool_floor": 0}, {"optim.lambda_cam": -1}])
def test_bad_values_are_rejected(override):
    with pytest.raises(ValidationError):
        resolve_config(None, override)


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[2] / "train" / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_recipe_resolves(path):
    """The release recipes under train/configs are valid configs (a renamed field fails here, not hours into a run)."""
    cfg = resolve_config(path)
    assert cfg.model.encoder.startswith("tf_efficientnet_lite") and cfg.model.pretrained == "imagenet"
