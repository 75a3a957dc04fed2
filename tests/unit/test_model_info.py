"""serving's ModelInfo read from a Triton model config: the learned OOD threshold and the outputs to ask for, with
models exported before the OOD score still served (no learned check, the heuristics stay)."""

import json

import pytest

from braintumor.export import contract
from braintumor.export.model_contract import ModelContract
from braintumor.export.triton_config import model_config
from braintumor.train.preprocess import PreprocessConfig
from braintumor.serving.backend import ModelInfo
from braintumor.serving.wire import model_info_message

tritonclient = pytest.importorskip("tritonclient.grpc")


def _config_json(ood: bool) -> dict:
    """config.pbtxt as `braintumor export` writes it, in the JSON form Triton's get_model_config answers."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    params = ModelContract(("glioma", "meningioma", "pituitary", "no_tumor"), PreprocessConfig(image_size=32), 0.5,
                           refer_threshold=0.6, disagree_min_area=80.0, ood_threshold=987.5 if ood else None,
                           cam_size=2).to_parameters()
    text = model_config("brain_tumor", "python", 32, 4, 2, parameters=params, ood=ood)
    message = text_format.Parse(text, model_config_pb2.ModelConfig())
    return json.loads(json_format.MessageToJson(message, preserving_proto_field_name=True))


@pytest.mark.parametrize("ood", [True, False])
def test_model_info_reads_the_ood_threshold_and_the_outputs(ood):
    info = ModelInfo.from_config(_config_json(ood), version="3")
    assert info.ood_threshold == (987.5 if ood else None)
    assert info.outputs == (contract.FULL_OUTPUTS if ood else contract.BASE_OUTPUTS)
    assert info.to_dict()["ood_threshold"] == info.ood_threshold
    message = model_info_message(info)  # GET /model and GetModelInfo carry the same threshold
    assert message.HasField("ood_threshold") is ood
    if ood:
        assert message.ood_threshold == info.to_dict()["ood_threshold"]
