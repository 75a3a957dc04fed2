"""Multi-task model: shapes, channel wiring from feature_info, config round trip, normalisation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch

from braintumor.train.encoder import Encoder
from braintumor.train.factory import build_model
from braintumor.train.model import Normalize
from braintumor.train.naming import CLASSES
from braintumor.train.preprocess import PreprocessConfig, normalize

TINY = "test_resnet"


def _input(batch: int = 2, size: int = 64) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 1, size, size), generator=torch.Generator().manual_seed(0)).float()


@pytest.mark.parametrize("encoder", [TINY, "resnet18"])
@pytest.mark.parametrize("mask_stride", [1, 2, 4])
def test_output_shapes(encoder: str, mask_stride: int) -> None:
    model = build_model(encoder, mask_stride=mask_stride).eval()
    with torch.no_grad():
        logits, mask = model(_input())
    assert logits.shape == (2, len(CLASSES))
    assert mask.shape == (2, 1, 64, 64)
    assert model.decoder.output_stride == mask_stride


@pytest.mark.parametrize("mask_stride, blocks", [(1, 5), (2, 4), (4, 3)])
def test_channels_come_from_feature_info(mask_stride: int, blocks: int) -> None:
    info = timm.create_model(TINY, features_only=True, in_chans=1).feature_info
    channels = info.channels()
    model = build_model(TINY, mask_stride=mask_stride, decoder_channels=(40, 30, 20, 10, 8))
    assert model.encoder.channels == tuple(channels)
    assert model.encoder.reductions == tuple(info.reduction())
    assert model.classification_head.fc.in_features == channels[-1]
    assert len(model.decoder.blocks) == blocks
    assert model.decoder.blocks[0].conv1[0].in_channels == channels[-1] + channels[-2]
    assert model.decoder.blocks[-1].conv2[0].out_channels == (40, 30, 20, 10, 8)[blocks - 1]
    assert model.segmentation_head.conv.in_channels == model.decoder.out_channels


def test_config_round_trip_through_json() -> None:
    model = build_model(TINY, num_classes=3, preprocess={"image_size": 128, "mean": 10.0}, mask_stride=4, dropout=0.1)
    config = json.loads(json.dumps(model.config))
    rebuilt = build_model(**config)
    assert rebuilt.config == model.config
    assert config["preprocess"]["image_size"] == 128
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x = _input(size=32)
    model.eval()
    rebuilt.eval()
    with torch.no_grad():
        for a, b in zip(model(x), rebuilt(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_encoder_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="tf_efficientnet_lite0, tf_efficientnet_lite1, resnet18, resnet34") as info:
        build_model("resnet19")
    assert "resnet10t" in str(info.value)  # the timm resnet family is listed too


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mask_stride": 8}, "mask_stride"),
        ({"decoder_channels": (8, 8)}, "decoder_channels"),
        ({"preprocess": PreprocessConfig(image_size=100)}, "multiple of 32"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_bad_arguments_say_what_is_wrong(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_model(TINY, **kwargs)


def test_channels_last_matches_contiguous() -> None:
    model = build_model(TINY, mask_stride=1).eval()
    x = _input()
    with torch.no_grad():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last)
        actual = model(x.contiguous(memory_format=torch.channels_last))
    for a, b in zip(actual, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_normalize_is_exactly_the_preprocess_contract() -> None:
    cfg = PreprocessConfig()
    pixels = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16)
    out = Normalize(cfg.mean, cfg.std)(torch.from_numpy(pixels).float())
    assert torch.equal(out, torch.from_numpy(normalize(pixels, cfg)))
    assert torch.equal(out, (torch.from_numpy(pixels).float() - cfg.mean) / cfg.std)
    assert "normalize.mean" not in build_model(TINY).state_dict()  # the config holds it, once


def test_cam_mean_plus_bias_is_the_logit() -> None:
    model = build_model(TINY).eval()
    with torch.no_grad():
        features = model.forward_features(_input())
        cams = model.class_activation_maps(features)
        logits = model.classify(features)
    assert cams.shape == (2, len(CLASSES), 2, 2)
    torch.testing.assert_close(cams.mean(dim=(2, 3)) + model.classification_head.fc.bias, logits)


def test_cam_layer_outputs_the_last_feature_map_by_default() -> None:
    model = build_model(TINY).eval()
    seen = []
    handle = model.cam_layer.register_forward_hook(lambda module, args, output: seen.append(output))
    try:
        with torch.no_grad():
            features = model.forward_features(_input())
            model.classify(features)
    finally:
        handle.remove()
    assert torch.equal(seen[0], features[-1])
    assert model.cam_stride == 32 and model.config["cam_stride"] == 32


def test_cam_at_stride_16_fuses_the_two_deepest_maps_exactly() -> None:
    model = build_model(TINY, cam_stride=16).eval()
    with torch.no_grad():
        features = model.forward_features(_input())
        fused = model.cam_fusion(features)
        cams = model.class_activation_maps(features)
        logits = model.classify(features)
    channels = model.encoder.channels
    assert fused.shape == (2, channels[-1] + channels[-2], 4, 4) and cams.shape == (2, len(CLASSES), 4, 4)
    # Nearest upsampling keeps the deep map's mean: GAP of the fused map is GAP of each feature.
    torch.testing.assert_close(fused[:, channels[-2]:].mean(dim=(2, 3)), features[-1].mean(dim=(2, 3)))
    torch.testing.assert_close(fused[:, : channels[-2]], features[-2])
    torch.testing.assert_close(cams.mean(dim=(2, 3)) + model.classification_head.fc.bias, logits)
    assert build_model(**model.config).cam_stride == 16


def test_cam_stride_must_be_an_encoder_reduction() -> None:
    with pytest.raises(ValueError, match="cam_stride 12 is not one of the encoder's reductions"):
        build_model(TINY, cam_stride=12)


def test_pretrained_file_is_loaded_and_stem_adapted(tmp_path) -> None:
    rgb = timm.create_model(TINY)
    path = tmp_path / "weights.pth"
    torch.save(rgb.state_dict(), path)
    encoder = Encoder(TINY, pretrained=path)
    stem = dict(encoder.model.named_parameters())["conv1.0.weight"]
    torch.testing.assert_close(stem, rgb.state_dict()["conv1.0.weight"].sum(dim=1, keepdim=True))
    torch.testing.assert_close(
        dict(encoder.model.named_parameters())["layer4.0.conv1.weight"], rgb.state_dict()["layer4.0.conv1.weight"]
    )


def test_missing_pretrained_file_raises(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        Encoder(TINY, pretrained=tmp_path / "absent.pth")


# -- class_pool: the class head pools the CAM grid with the mask head's own (detached) probability --------------------
@pytest.mark.parametrize("class_pool", ["mean", "mask"])
def test_cam_mean_plus_bias_is_exactly_the_logit_in_both_pool_modes(class_pool: str) -> None:
    torch.manual_seed(0)
    model = build_model(TINY, cam_stride=16, class_pool=class_pool).double().eval()
    x = _input(size=64).double()
    with torch.no_grad():
        features = model.forward_features(x)
        logits, mask_logits = model(x)
        cams = model.class_activation_maps(features)
        pooled = model.class_features(features, mask_logits)
    head = model.classification_head
    torch.testing.assert_close(cams.mean(dim=(2, 3)) + head.fc.bias, logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pooled @ head.fc.weight.T + head.fc.bias, logits, rtol=1e-12, atol=1e-12)
    if class_pool == "mask":  # the CAM is the weighted map, not the GAP model's: the test can tell them apart
        assert not torch.allclose(cams.mean(dim=(2, 3)), model.cam_fusion(features).mean(dim=(2, 3)) @ head.fc.weight.T)


def test_mask_pool_with_an_empty_mask_is_plain_gap() -> None:
    torch.manual_seed(0)
    mean = build_model(TINY, cam_stride=16).eval()
    mask = build_model(TINY, cam_stride=16, class_pool="mask", class_pool_floor=0.3).eval()
    mask.load_state_dict(mean.state_dict(), strict=True)  # pooling adds no parameters
    x = _input()
    with torch.no_grad():
        features = mean.forward_features(x)
        empty = torch.full((2, 1, 64, 64), -1e4)  # sigmoid -> exactly 0
        blob = empty.clone()
        blob[:, :, :16, :16] = 1e4
        torch.testing.assert_close(mask.classify(features, empty), mean.classify(features))
        torch.testing.assert_close(mask.class_activation_maps(features, empty), mean.class_activation_maps(features))
        torch.testing.assert_close(mask.class_features(features, empty), mean.class_features(features))
        weights = mask.classification_head.pool_weights(mask.cam_fusion(features), blob)
    # a 16x16 tumour in the corner covers one 16-px cell of the 4x4 grid: weight (1 + f) / (1 + 16 f) there
    assert weights.shape == (2, 1, 4, 4)
    torch.testing.assert_close(weights[:, 0, 0, 0], torch.full((2,), 1.3 / (1 + 16 * 0.3)))
    torch.testing.assert_close(weights.sum(dim=(2, 3)), torch.ones(2, 1))


def test_mask_pool_gives_the_decoder_no_gradient_from_the_class_loss() -> None:
    torch.manual_seed(0)
    model = build_model(TINY, cam_stride=16, class_pool="mask").train()
    features = model.forward_features(_input())
    loss = torch.nn.functional.cross_entropy(model.classify(features), torch.tensor([0, 2]))
    loss.backward()
    decoder = [*model.decoder.parameters(), *model.segmentation_head.parameters()]
    assert all(p.grad is None or not p.grad.any() for p in decoder)
    assert model.classification_head.fc.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.any() for p in model.encoder.parameters())


@pytest.mark.parametrize("class_pool, decoder_runs", [("mean", 1), ("mask", 1)])
def test_forward_runs_the_decoder_once(class_pool: str, decoder_runs: int) -> None:
    model = build_model(TINY, class_pool=class_pool).eval()
    calls = []
    handle = model.decoder.register_forward_hook(lambda *args: calls.append(1))
    try:
        with torch.no_grad():
            model(_input())
            features = model.forward_features(_input())
            model.classify(features)  # without the mask logits the "mask" head runs the decoder itself
    finally:
        handle.remove()
    assert len(calls) == decoder_runs + (class_pool == "mask")


def test_class_pool_round_trips_and_bad_values_are_named() -> None:
    model = build_model(TINY, class_pool="mask", class_pool_floor=0.25)
    rebuilt = build_model(**json.loads(json.dumps(model.config)))
    assert rebuilt.config["class_pool"] == "mask" and rebuilt.classification_head.pool_floor == 0.25
    assert build_model(TINY).config["class_pool"] == "mean"
    with pytest.raises(ValueError, match=r"class_pool 'max' is not one of \('mean', 'mask'\)"):
        build_model(TINY, class_pool="max")
    with pytest.raises(ValueError, match="class_pool_floor must be > 0"):
        build_model(TINY, class_pool="mask", class_pool_floor=0.0)
