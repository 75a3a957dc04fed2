"""The typed deployment contract round-trips through every form it is written in: checkpoint state -> contract ->
metadata.json -> contract, contract -> config.pbtxt parameters -> contract, and config.pbtxt text (as Triton's own
protobuf parses it) -> serving's ModelInfo, for both backends' reading path."""

import json

import pytest

from braintumor.export import contract as tensors
from braintumor.export.model_contract import ModelContract
from braintumor.export.triton_config import metadata_configs, model_config
from braintumor.train.naming import CLASSES
from braintumor.train.preprocess import PreprocessConfig
from braintumor.train.refer import ReferRules

FULL = ModelContract(CLASSES, PreprocessConfig(image_size=192, mean=127.5, std=127.5), temperature=1.37,
                     refer_threshold=0.8125, disagree_min_area=42.0, ood_threshold=1004.25, cam_size=12)
BARE = ModelContract(CLASSES, PreprocessConfig(image_size=64), cam_size=4)  # nothing calibrated or fitted yet


def _state(c: ModelContract) -> dict:
    """A checkpoint's state as train/ writes it (trainer/checkpoint.py, calibrate.py, ood.py)."""
    state = {"classes": list(c.classes), "preprocess": c.preprocess.to_dict(), "temperature": c.temperature,
             "model": {}, "epoch": 3}
    if c.refer_threshold is not None:
        state.update(refer_threshold=c.refer_threshold, disagree_min_area=c.disagree_min_area)
    if c.ood_threshold is not None:
        state["ood"] = {"threshold": c.ood_threshold, "means": [[0.0]], "whitening": [[1.0]]}
    return state


@pytest.mark.parametrize("model", [FULL, BARE], ids=["calibrated", "bare"])
def test_checkpoint_metadata_and_parameters_round_trip(model):
    built = ModelContract.from_checkpoint(_state(model), cam_size=model.cam_size)
    assert built == model
    meta = json.loads(json.dumps(built.to_metadata()))  # as written to and read from metadata.json
    assert ModelContract.from_metadata(meta) == model
    assert meta["image_size"] == model.image_size and meta["cam_size"] == model.cam_size
    params = built.to_parameters()
    assert all(isinstance(v, str) for v in params.values())
    assert ModelContract.from_parameters(params) == model
    assert (tensors.PARAM_OOD_THRESHOLD in params) == (model.ood_threshold is not None)  # unset rules are left out
    assert model.refer_rules == ReferRules(model.refer_threshold, model.disagree_min_area, model.ood_threshold)


@pytest.mark.parametrize("model", [FULL, BARE], ids=["calibrated", "bare"])
def test_config_text_read_back_by_serving_equals_the_contract(model):
    """What the export writes into config.pbtxt, parsed by Triton's protobuf into the JSON of Triton's model-config
    API (TritonModel reads it over gRPC, LocalModel from the file, both through ModelInfo.from_config)."""
    pytest.importorskip("tritonclient.grpc")
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    from braintumor.serving.backend import ModelInfo

    meta = {"name": tensors.DEFAULT_NAME, "variant": "python", **model.to_metadata(),
            "outputs": [{"name": n} for n in (tensors.FULL_OUTPUTS if model.ood_threshold else tensors.BASE_OUTPUTS)]}
    for text in metadata_configs(meta).values():
        message = text_format.Parse(text, model_config_pb2.ModelConfig())
        config = json.loads(json_format.MessageToJson(message, preserving_proto_field_name=True))
        info = ModelInfo.from_config(config, version="7")
        assert info.contract == model and info.classes == model.classes and info.refer_rules == model.refer_rules
        assert info.outputs == (tensors.FULL_OUTPUTS if model.ood_threshold else tensors.BASE_OUTPUTS)


def test_a_config_without_the_contract_is_refused_by_name():
    from braintumor.serving.backend import ModelInfo
    from braintumor.serving.errors import UpstreamError

    with pytest.raises(KeyError, match="preprocess"):
        ModelContract.from_parameters({tensors.PARAM_CLASSES: json.dumps(list(CLASSES))})
    text_free = {"name": "other", "parameters": {}}
    with pytest.raises(UpstreamError, match="braintumor export"):
        ModelInfo.from_config(text_free)
    assert model_config("m", "python", 64, 4, 4, parameters=BARE.to_parameters()).count("parameters {") >= 4


def test_the_bundled_models_metadata_is_a_contract():
    from braintumor.export.contract import METADATA_FILE
    from braintumor.export.triton_config import latest_version
    from pathlib import Path

    repository = Path(__file__).resolve().parents[2] / "model_repository" / tensors.DEFAULT_NAME
    meta = json.loads((latest_version(repository) / METADATA_FILE).read_text())
    model = ModelContract.from_metadata(meta)
    assert model.ood_threshold is not None and model.refer_threshold is not None and model.classes == CLASSES
    assert {k: meta[k] for k in model.to_metadata()} == model.to_metadata()  # nothing lost or reformatted
