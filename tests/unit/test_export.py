"""Export on a tiny synthetic run: ONNX parity, dynamic batch, config.pbtxt vs Triton's protobuf, manifest, python
backend model, TensorRT's clear error and profile logic, fp16 weight storage."""

import importlib.util
import json
import sys
import types

import numpy as np
import pytest
import torch

from braintumor.export import contract
from braintumor.export.manifest import ManifestError, verify_manifest, write_manifest
from braintumor.export.onnx_export import (
    ParityError,
    compare,
    onnx_session,
    parity_images,
    run_session,
    run_torch,
)
from braintumor.export.repository import ExportOptions, export_repository, next_version
from braintumor.export.tensorrt import BatchProfile, TensorRTUnavailable, require_tensorrt
from braintumor.export.triton_config import (
    TritonOptions,
    layout_configs,
    layout_file,
    layout_options,
    model_config,
)
from braintumor.export.model_contract import ModelContract
from braintumor.export.wrappers import build_graphs
from braintumor.train.preprocess import PreprocessConfig
from braintumor.train.ood import mahalanobis

SIZE = 32  # the image size of the session's tiny model (tests/conftest.py TINY_SIZE, tiny_ood_checkpoint)


@pytest.fixture(scope="module")
def checkpoint(tiny_ood_checkpoint):
    """(checkpoint, data): the session's tiny model with a fitted OOD score (tests/conftest.py), shared with the
    embedded Triton e2e tests; the full graph gets ood_score, as the release model's."""
    return tiny_ood_checkpoint


@pytest.fixture(scope="module")
def repository(tiny_ood_repository):
    """(out, published): the session's export of :func:`checkpoint` (parity on 6 slices)."""
    return tiny_ood_repository


def test_export_writes_both_models_with_parity(repository, checkpoint):
    out, published = repository
    assert [(p.name, p.version) for p in published] == [("brain_tumor", 1), ("brain_tumor_classifier", 1)]
    for item in published:
        files = {p.name for p in item.folder.iterdir()}
        assert files == {"model.onnx", "model.py", "metadata.json", "manifest.json"}
        assert (out / item.name / "config.pbtxt").is_file()
        assert not list((out / item.name).glob(".*tmp*")), "temporary version folder left behind"
        assert not list(item.folder.glob("*.data")), "weights must be inside model.onnx"
        for p in item.parity:  # outputs of order 1, except ood_score (hundreds): its relative error is the bound
            assert p.max_abs <= p.atol + p.rtol or (p.name == contract.OOD_SCORE and p.max_rel <= p.rtol), str(p)
    assert [p.name for p in published[0].parity] == list(contract.FULL_OUTPUTS)
    assert [p.name for p in published[1].parity] == list(contract.CLASSIFIER_OUTPUTS)
    meta = json.loads((published[0].folder / "metadata.json").read_text())
    assert meta["classes"][3] == "no_tumor" and meta["preprocess"]["image_size"] == SIZE
    assert meta["temperature"] == 1.0 and meta["cam_size"] == SIZE // 16  # cam_stride 16 (the config default)
    state = torch.load(checkpoint[0], map_location="cpu", weights_only=False)
    config = (out / "brain_tumor" / "config.pbtxt").read_text()
    assert meta["ood_threshold"] == state["ood"]["threshold"] > 0
    assert f'key: "ood_threshold" value {{ string_value: "{json.dumps(meta["ood_threshold"])}" }}' in config


@pytest.mark.parametrize("batch", [1, 3])
def test_dynamic_batch_matches_pytorch(repository, checkpoint, batch):
    from braintumor.train.trainer.checkpoint import load_model

    out, published = repository
    model, state = load_model(checkpoint[0])
    graphs = build_graphs(model, state)
    images = np.random.default_rng(batch).integers(0, 256, (batch, 1, SIZE, SIZE), dtype=np.uint8)
    for item, key in zip(published, ("full", "classifier")):
        session = onnx_session(item.folder / "model.onnx")
        assert session.get_inputs()[0].name == contract.INPUT_NAME
        assert session.get_inputs()[0].type == "tensor(uint8)"
        got = run_session(session, images)
        specs = contract.output_specs(SIZE, 4, SIZE // 16, classifier=key == "classifier")
        assert {k: v.shape for k, v in got.items()} == {s.name: s.batched(batch) for s in specs}
        compare(got, run_torch(graphs[key], images))


def test_graph_outputs_follow_the_model_exactly(checkpoint):
    """Exact identities on the toy model: probs = softmax((mean CAM + bias) / T), mask = sigmoid(mask logits)."""
    from braintumor.train.trainer.checkpoint import load_model

    model, state = load_model(checkpoint[0])
    x = torch.randint(0, 256, (2, 1, SIZE, SIZE), dtype=torch.uint8)
    with torch.no_grad():
        logits, mask_logits = model(x.float())
        probs, mask, cam, ood = build_graphs(model, {**state, "temperature": 2.0})["full"](x)
        pooled = model.class_features(model.forward_features(x.float())).double().numpy()
    torch.testing.assert_close(probs, torch.softmax(logits / 2.0, dim=1))
    torch.testing.assert_close(mask, torch.sigmoid(mask_logits))
    bias = model.classification_head.fc.bias
    torch.testing.assert_close(cam.mean(dim=(2, 3)) + bias, logits, atol=1e-5, rtol=1e-5)
    # ood_score = min_c (f - mu_c)^T P (f - mu_c), P = W W^T, on the class head's pooled input
    means, w = (state["ood"][k].astype(np.float64) for k in ("means", "whitening"))
    expected = mahalanobis(pooled, means, w @ w.T)
    assert ood.shape == (2, 1)
    np.testing.assert_allclose(ood[:, 0].numpy(), expected, rtol=1e-4)


def test_onnx_ood_score_equals_the_fitted_score(repository, checkpoint):
    """ONNX Runtime's ood_score vs train/ood.py's float64 score of the PyTorch features, at the parity tolerance."""
    from braintumor.export.onnx_export import PARITY_ATOL, PARITY_RTOL
    from braintumor.train.ood import OodModel
    from braintumor.train.predict import predict_arrays
    from braintumor.train.trainer.checkpoint import load_model

    _, published = repository
    model, state = load_model(checkpoint[0])
    images = parity_images(state["preprocess"], checkpoint[1], count=6)
    got = run_session(onnx_session(published[0].folder / "model.onnx"), images)[contract.OOD_SCORE]
    features = predict_arrays(model, images[:, 0], with_masks=False, with_features=True)["features"]
    expected = OodModel.from_state(state["ood"]).score(features)
    np.testing.assert_allclose(got[:, 0], expected, atol=PARITY_ATOL, rtol=PARITY_RTOL)
    assert any(p.name == contract.OOD_SCORE for p in published[0].parity)


def test_a_checkpoint_without_ood_exports_the_base_outputs(checkpoint, tmp_path):
    state = torch.load(checkpoint[0], map_location="cpu", weights_only=False)
    for key in ("ood", "ood_threshold"):
        state.pop(key)
    old = tmp_path / "old.pt"
    torch.save(state, old)
    published = export_repository(old, tmp_path / "repo", ExportOptions(parity_count=2))
    assert [p.name for p in published[0].parity] == list(contract.BASE_OUTPUTS)
    meta = json.loads((published[0].folder / "metadata.json").read_text())
    assert meta["ood_threshold"] is None and [o["name"] for o in meta["outputs"]] == list(contract.BASE_OUTPUTS)
    assert "ood" not in (tmp_path / "repo" / "brain_tumor" / "config.pbtxt").read_text()


@pytest.mark.parametrize("class_pool", ["mean", "mask"])
def test_both_class_pools_export_with_parity(class_pool, tmp_path):
    """A freshly built tiny model of each class_pool (no training needed): ONNX checker + Runtime parity of both graphs,
    and the exported CAM still decomposes the exported logit (mean + bias; class_pool "mask" pools with the mask)."""
    from braintumor.export.onnx_export import check_parity, export_onnx
    from braintumor.train.factory import build_model

    torch.manual_seed(0)
    model = build_model("test_resnet", preprocess={"image_size": SIZE}, cam_stride=16, class_pool=class_pool).eval()
    k = model.classification_head.fc.in_features
    rng = np.random.default_rng(0)
    ood = {"means": rng.normal(size=(4, k)), "whitening": rng.normal(size=(k, k)) / k}
    graphs = build_graphs(model, {"temperature": 1.0, "ood": ood})
    images = parity_images({"image_size": SIZE}, None, count=3)
    for key, graph in graphs.items():
        path = export_onnx(graph, tmp_path / f"{key}.onnx", SIZE)
        parity = check_parity(graph, path, images)
        assert [p.name for p in parity] == list(graph.output_names)
    got = run_session(onnx_session(tmp_path / "full.onnx"), images)
    logits = np.log(got[contract.CLASS_PROBS])  # temperature 1: log softmax = logits - logsumexp
    mean_cam = got[contract.CAM].mean(axis=(2, 3)) + model.classification_head.fc.bias.detach().numpy()
    np.testing.assert_allclose(logits - logits.mean(1, keepdims=True), mean_cam - mean_cam.mean(1, keepdims=True),
                               atol=1e-4)


def test_parity_failure_names_the_output():
    ref = {"class_probs": np.full((2, 4), 0.25, np.float32), "cam": np.ones((2, 4, 1, 1), np.float32)}
    bad = {"class_probs": ref["class_probs"].copy(), "cam": ref["cam"] + 0.01}
    assert [p.name for p in compare(ref, ref)] == ["class_probs", "cam"]
    with pytest.raises(ParityError, match="cam"):
        compare(bad, ref)


def test_real_parity_images_are_preprocessed_uint8(checkpoint):
    images = parity_images({"image_size": SIZE}, checkpoint[1], count=5)
    assert images.shape == (5, 1, SIZE, SIZE) and images.dtype == np.uint8 and images.any()
    synthetic = parity_images({"image_size": SIZE}, None, count=3)
    assert synthetic.shape == (3, 1, SIZE, SIZE)


def _parse(text):
    from google.protobuf import text_format

    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    return text_format.Parse(text, model_config_pb2.ModelConfig()), model_config_pb2


@pytest.mark.parametrize(
    "variant, classifier, runtime, kind",
    [
        ("python", False, ("backend", "python"), "KIND_CPU"),
        ("python", True, ("backend", "python"), "KIND_CPU"),
        ("onnxruntime", False, ("platform", "onnxruntime_onnx"), "KIND_CPU"),
        ("tensorrt_plan", False, ("platform", "tensorrt_plan"), "KIND_GPU"),
        ("tensorrt_plan", True, ("platform", "tensorrt_plan"), "KIND_GPU"),
    ],
)
def test_config_parses_with_tritons_protobuf(variant, classifier, runtime, kind):
    params = ModelContract(("glioma", "meningioma", "pituitary", "no_tumor"), PreprocessConfig(image_size=128), 1.5,
                           refer_threshold=0.3, ood_threshold=123.5, cam_size=4).to_parameters()
    name = contract.classifier_name() if classifier else contract.DEFAULT_NAME
    cfg, pb = _parse(model_config(name, variant, 128, 4, 4, classifier=classifier, parameters=params,
                                  options=TritonOptions(warmup="random"), ood=True))
    assert cfg.name == name and getattr(cfg, runtime[0]) == runtime[1]
    assert cfg.max_batch_size == 32
    assert [(i.name, i.data_type, list(i.dims)) for i in cfg.input] == [("image", pb.TYPE_UINT8, [1, 128, 128])]
    expected = contract.output_specs(128, 4, 4, classifier=classifier)
    assert [(o.name, o.data_type, tuple(o.dims)) for o in cfg.output] == [(s.name, pb.TYPE_FP32, s.dims) for s in expected]
    assert list(cfg.dynamic_batching.preferred_batch_size) == [8, 16, 32]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 1000
    assert cfg.instance_group[0].count == 1 and pb.ModelInstanceGroup.Kind.Name(cfg.instance_group[0].kind) == kind
    assert cfg.version_policy.latest.num_versions == 1
    warm = cfg.model_warmup[0].inputs["image"]
    assert warm.random_data and list(warm.dims) == [1, 128, 128] and warm.data_type == pb.TYPE_UINT8
    assert json.loads(cfg.parameters["classes"].string_value)[3] == "no_tumor"
    assert json.loads(cfg.parameters["preprocess"].string_value) == PreprocessConfig(image_size=128).to_dict()
    assert json.loads(cfg.parameters["temperature"].string_value) == 1.5
    assert json.loads(cfg.parameters["refer_threshold"].string_value) == 0.3
    assert json.loads(cfg.parameters["ood_threshold"].string_value) == 123.5
    assert ("intra_op_threads" in cfg.parameters) == (variant == "python")


def test_written_config_matches_the_exported_graph(repository):
    out, published = repository
    for item in published:
        cfg, _ = _parse((out / item.name / "config.pbtxt").read_text())
        session = onnx_session(item.folder / "model.onnx")
        assert [o.name for o in cfg.output] == [o.name for o in session.get_outputs()]
        for o, g in zip(cfg.output, session.get_outputs()):
            assert list(o.dims) == g.shape[1:]
        assert cfg.parameters["preprocess"].string_value == json.dumps(
            json.loads((item.folder / "metadata.json").read_text())["preprocess"], sort_keys=True)


def test_export_writes_every_serving_layout_from_one_generator(repository):
    """config.pbtxt (latency) and configs/throughput.pbtxt: the same model, the throughput layout with more instances;
    both are what layout_configs regenerates from the version's metadata.json."""
    out, published = repository
    for item in published:
        latency = (out / item.name / "config.pbtxt").read_text()
        throughput = (out / item.name / "configs" / "throughput.pbtxt").read_text()
        assert layout_configs(out / item.name) == {"latency": latency, "throughput": throughput}
        a, _ = _parse(latency)
        b, _ = _parse(throughput)
        assert (a.instance_group[0].count, b.instance_group[0].count) == (1, contract.THROUGHPUT_INSTANCES)
        b.instance_group[0].count = a.instance_group[0].count
        assert a == b  # nothing else differs


def test_layout_options():
    base = TritonOptions(max_batch_size=8, preferred_batch_sizes=(4, 8))
    assert layout_options(base, "latency") is base
    assert layout_options(base, "throughput") == TritonOptions(max_batch_size=8, preferred_batch_sizes=(4, 8),
                                                               instance_count=contract.THROUGHPUT_INSTANCES)
    assert layout_options(TritonOptions(instance_count=4), "throughput").instance_count == 4  # never fewer
    assert layout_file("latency") == "config.pbtxt" and layout_file("throughput") == "configs/throughput.pbtxt"
    with pytest.raises(ValueError, match="layout"):
        layout_options(base, "fast")


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_batch_size": 8, "preferred_batch_sizes": (4, 16)}, "preferred"),
        ({"instance_kind": "KIND_TPU"}, "instance_kind"),
        ({"warmup": "ones"}, "warmup"),
    ],
)
def test_bad_triton_options_are_refused(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        TritonOptions(**kwargs)


def test_bad_variant_and_name_are_refused():
    with pytest.raises(ValueError, match="variant"):
        model_config("m", "tensorflow", 32, 4, 1)
    with pytest.raises(ValueError, match="model name"):
        model_config("../m", "python", 32, 4, 1)


def _load_backend_model(path, monkeypatch):
    """Import a version folder's model.py with a minimal stand-in for Triton's triton_python_backend_utils."""
    fake = types.ModuleType("triton_python_backend_utils")

    class Tensor:
        def __init__(self, name, array):
            self.name, self.array = name, array

        def as_numpy(self):
            return self.array

    class InferenceResponse:
        def __init__(self, output_tensors, error=None):
            self.output_tensors, self.error = output_tensors, error

    class Logger:
        messages = []
        log_info = log_warn = log_error = staticmethod(messages.append)

    fake.Tensor, fake.InferenceResponse, fake.Logger = Tensor, InferenceResponse, Logger
    fake.TritonError = RuntimeError
    fake.get_input_tensor_by_name = lambda request, name: request[name]
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    spec = importlib.util.spec_from_file_location("triton_model_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, fake


def _imported_modules(path):
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add((node.module or "").split(".")[0])
    return names


def _backend_args(out, item):
    from google.protobuf import json_format

    cfg, _ = _parse((out / item.name / "config.pbtxt").read_text())
    return {"model_config": json_format.MessageToJson(cfg, preserving_proto_field_name=True),
            "model_repository": str(out / item.name), "model_version": str(item.version),
            "model_instance_kind": "CPU", "model_instance_device_id": "0"}


def test_python_backend_batches_requests_like_onnxruntime(repository, monkeypatch):
    out, published = repository
    item = published[0]
    module, pb = _load_backend_model(item.folder / "model.py", monkeypatch)
    model = module.TritonPythonModel()
    model.initialize(_backend_args(out, item))
    assert _imported_modules(item.folder / "model.py") <= {"hashlib", "json", "os", "pathlib", "time", "numpy",
                                                           "onnxruntime", "triton_python_backend_utils"}
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (n, 1, SIZE, SIZE), dtype=np.uint8) for n in (1, 3, 2)]
    responses = model.execute([{"image": pb.Tensor("image", a)} for a in arrays])
    reference = run_session(onnx_session(item.folder / "model.onnx"), np.concatenate(arrays))
    start = 0
    for array, response in zip(arrays, responses):
        assert response.error is None
        got = {t.name: t.array for t in response.output_tensors}
        assert list(got) == list(contract.FULL_OUTPUTS)
        for name, value in got.items():
            np.testing.assert_allclose(value, reference[name][start:start + len(array)], atol=1e-6, rtol=1e-5)
        start += len(array)
    bad = model.execute([{"image": pb.Tensor("image", np.zeros((1, 1, SIZE + 1, SIZE), np.uint8))}])
    assert bad[0].error is not None and "inference failed" in str(bad[0].error)
    model.finalize()


def test_manifest_verifies_then_names_the_corrupted_file(tmp_path, monkeypatch):
    (tmp_path / "model.onnx").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "metadata.json").write_text("{}")
    write_manifest(tmp_path)
    assert set(verify_manifest(tmp_path)["files"]) == {"model.onnx", "metadata.json"}
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"x")  # written by Python at load: ignored
    verify_manifest(tmp_path)

    data = bytearray((tmp_path / "model.onnx").read_bytes())
    data[100] ^= 0x01
    (tmp_path / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"model\.onnx: sha256 does not match"):
        verify_manifest(tmp_path)
    (tmp_path / "model.onnx").write_bytes(bytes(data[:-1]))
    with pytest.raises(ManifestError, match=r"model\.onnx: size"):
        verify_manifest(tmp_path)
    (tmp_path / "model.onnx").unlink()
    with pytest.raises(ManifestError, match=r"model\.onnx: listed in manifest\.json but missing"):
        verify_manifest(tmp_path)
    with pytest.raises(ManifestError, match="manifest missing"):
        verify_manifest(tmp_path / "__pycache__")


def test_corrupted_model_refuses_to_load_in_the_python_backend(repository, tmp_path, monkeypatch):
    import shutil

    out, published = repository
    item = published[1]
    copy = tmp_path / item.name
    shutil.copytree(out / item.name, copy)
    onnx_file = copy / str(item.version) / "model.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx_file.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"model\.onnx: sha256"):
        verify_manifest(onnx_file.parent)
    module, _ = _load_backend_model(onnx_file.parent / "model.py", monkeypatch)
    args = {**_backend_args(out, item), "model_repository": str(copy)}
    with pytest.raises(RuntimeError, match=r"model\.onnx: sha256 does not match manifest\.json.*refusing to load"):
        module.TritonPythonModel().initialize(args)


def test_versions_count_up_and_are_never_overwritten(checkpoint, repository):
    out, _ = repository
    assert next_version(out, ["brain_tumor", "brain_tumor_classifier"]) == 2
    with pytest.raises(FileExistsError, match="already exists"):
        export_repository(checkpoint[0], out, ExportOptions(version=1))


def test_onnxruntime_variant_has_no_python_model(checkpoint, tmp_path):
    published = export_repository(checkpoint[0], tmp_path, ExportOptions(backend="onnxruntime", version=3,
                                                                          parity_count=2))
    assert {p.name for p in published[0].folder.iterdir()} == {"model.onnx", "metadata.json", "manifest.json"}
    cfg, _ = _parse((tmp_path / "brain_tumor" / "config.pbtxt").read_text())
    assert cfg.platform == "onnxruntime_onnx" and cfg.default_model_filename == "model.onnx"
    verify_manifest(published[0].folder)


@pytest.mark.parametrize(
    "kwargs, shapes",
    [
        ({}, ((1, 1, 64, 64), (8, 1, 64, 64), (32, 1, 64, 64))),
        ({"min": 2, "opt": 2, "max": 4}, ((2, 1, 64, 64), (2, 1, 64, 64), (4, 1, 64, 64))),
    ],
)
def test_tensorrt_profile_shapes(kwargs, shapes):
    assert BatchProfile(**kwargs).shapes(64) == shapes


def test_tensorrt_profile_follows_triton_max_batch():
    assert BatchProfile.for_max_batch(4) == BatchProfile(1, 4, 4)
    assert BatchProfile.for_max_batch(64, opt=16) == BatchProfile(1, 16, 64)
    with pytest.raises(ValueError, match="min <= opt <= max"):
        BatchProfile(1, 8, 4)


def _tensorrt_ready():
    try:
        require_tensorrt()
    except TensorRTUnavailable:
        return False
    return True


@pytest.mark.skipif(_tensorrt_ready(), reason="this host has TensorRT and a GPU")
def test_tensorrt_missing_is_a_clear_error(checkpoint, tmp_path, capsys):
    with pytest.raises(TensorRTUnavailable, match="--backend python or --backend onnxruntime") as info:
        require_tensorrt()
    assert "tensorrt" in str(info.value) or "CUDA GPU" in str(info.value)
    with pytest.raises(TensorRTUnavailable):
        export_repository(checkpoint[0], tmp_path, ExportOptions(backend="tensorrt"))
    assert not (tmp_path / "brain_tumor").exists(), "nothing is written before TensorRT is known to work"

    args = _export_parser().parse_args(["export", "--checkpoint", str(checkpoint[0]), "--out", str(tmp_path),
                                        "--tensorrt"])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert "cannot build a TensorRT engine" in err and "Traceback" not in err


@pytest.mark.gpu
@pytest.mark.skipif(not _tensorrt_ready(), reason="needs tensorrt and a CUDA GPU")
def test_tensorrt_engine_build_and_parity(checkpoint, tmp_path):
    published = export_repository(checkpoint[0], tmp_path, ExportOptions(backend="tensorrt", parity_count=4))
    for item in published:
        assert (item.folder / "model.plan").stat().st_size > 0
        assert [p.name for p in item.tensorrt_parity] == [p.name for p in item.parity]
    cfg, _ = _parse((tmp_path / "brain_tumor" / "config.pbtxt").read_text())
    assert cfg.platform == "tensorrt_plan"


def _export_parser():
    import argparse

    from braintumor.export.commands import register

    parser = argparse.ArgumentParser(prog="braintumor")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_every_export_option_has_help():
    sub = _export_parser()._subparsers._group_actions[0].choices["export"]
    for action in sub._actions:
        if action.dest != "help":
            assert action.help, f"export {action.option_strings} has no help"


def test_cli_exports_and_prints_parity(checkpoint, tmp_path, capsys):
    args = _export_parser().parse_args(["export", "--checkpoint", str(checkpoint[0]), "--out", str(tmp_path),
                                        "--name", "tiny", "--version", "7", "--backend", "onnxruntime",
                                        "--max-batch-size", "4", "--parity-count", "2", "--no-progress"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "tiny v7" in printed and "tiny_classifier v7" in printed and "parity class_probs: max abs" in printed
    cfg, _ = _parse((tmp_path / "tiny" / "config.pbtxt").read_text())
    assert cfg.max_batch_size == 4 and list(cfg.dynamic_batching.preferred_batch_size) == []


def test_exported_model_scores_like_its_checkpoint(checkpoint, repository, tmp_path):
    """`evaluate --model-repository` (ONNX Runtime, no torch) reproduces `evaluate --checkpoint`."""
    import json

    from braintumor.serving.cli import main

    ckpt, data = checkpoint
    out, _ = repository
    assert main(["evaluate", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(tmp_path / "pt")]) == 0
    assert main(["evaluate", "--model-repository", str(out), "--data", str(data), "--out", str(tmp_path / "ort")]) == 0
    pt, ort = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("pt", "ort"))
    assert pt["n"] == ort["n"] > 0
    for key in ("accuracy", "macro_f1", "dice", "iou"):
        assert ort[key] == pytest.approx(pt[key], abs=1e-6), key
    assert ort["ece"] == pytest.approx(pt["ece"], abs=1e-4)
    assert (tmp_path / "ort" / "report.html").stat().st_size > 10_000


@pytest.fixture(scope="module")
def resnet18_onnx(tmp_path_factory):
    """A real-size resnet18 U-Net full graph at 64 px (random init): its layers are far above min_elements."""
    from braintumor.export.onnx_export import export_onnx
    from braintumor.train.factory import build_model

    torch.manual_seed(0)
    model = build_model("resnet18", preprocess={"image_size": 64}).eval()
    graph = build_graphs(model, {"temperature": 1.0})["full"]
    return graph, export_onnx(graph, tmp_path_factory.mktemp("r18") / "fp32.onnx", 64)


def test_fp16_storage_halves_the_file_and_keeps_fp32_compute(resnet18_onnx, tmp_path):
    import onnx

    from braintumor.export.fp16_storage import FP16_PARITY_TOLERANCES, store_weights_fp16
    from braintumor.export.onnx_export import check_onnx

    graph, fp32_path = resnet18_onnx
    info = store_weights_fp16(fp32_path, tmp_path / "fp16.onnx", min_elements=1024)
    assert 0.48 < info["bytes_after"] / info["bytes_before"] < 0.52, info
    assert info["bytes_after"] == (tmp_path / "fp16.onnx").stat().st_size and info["converted"] > 20
    assert not list(tmp_path.glob("*.data")), "weights must stay inside the .onnx file"

    model = check_onnx(tmp_path / "fp16.onnx")
    inits = {i.name: i for i in model.graph.initializer}
    casts = [n for n in model.graph.node if n.op_type == "Cast" and n.input[0] in inits]
    assert len(casts) == info["converted"]
    consumed = {name for n in model.graph.node for name in n.input}
    for cast in casts:
        assert inits[cast.input[0]].data_type == onnx.TensorProto.FLOAT16
        assert onnx.helper.get_attribute_value(cast.attribute[0]) == onnx.TensorProto.FLOAT
        assert cast.output[0] in consumed and cast.output[0] not in inits  # same name the layers used before
    for init in inits.values():  # what stays fp32 is small
        if init.data_type == onnx.TensorProto.FLOAT:
            assert np.prod(init.dims) < 1024, init.name

    images = parity_images({"image_size": 64}, None, count=2)
    got = run_session(onnx_session(tmp_path / "fp16.onnx"), images)
    assert all(v.dtype == np.float32 for v in got.values())
    report = compare(got, run_torch(graph, images), tolerances=FP16_PARITY_TOLERANCES)
    assert [p.name for p in report] == list(contract.BASE_OUTPUTS)  # no fitted OOD score on this graph
    assert max(p.max_abs for p in report) > 0, "weights were not rounded"


def test_fp16_storage_in_place_skips_small_and_out_of_range_weights(tmp_path):
    """Toy graph y = x @ a @ b: a is converted, b (beyond fp16's range) and the small c stay fp32; exact maths."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from braintumor.export.fp16_storage import store_weights_fp16

    rng = np.random.default_rng(0)
    a = rng.normal(size=(64, 32)).astype(np.float32)
    b = np.full((32, 32), 1e5, np.float32) * np.eye(32, dtype=np.float32)
    c = rng.normal(size=(32,)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "a"], ["h"]), helper.make_node("MatMul", ["h", "b"], ["g"]),
         helper.make_node("Add", ["g", "c"], ["y"])], "toy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 32])],
        [numpy_helper.from_array(a, "a"), numpy_helper.from_array(b, "b"), numpy_helper.from_array(c, "c")])
    path = tmp_path / "toy.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))

    info = store_weights_fp16(path, min_elements=1024)
    assert (info["converted"], info["skipped_out_of_range"], info["kept_fp32"]) == (1, 1, 1)
    assert info["weight_bytes_after"] == a.size * 2 + b.nbytes + c.nbytes
    stored = {i.name: i.data_type for i in onnx.load(str(path)).graph.initializer}
    assert stored == {"a__fp16": TensorProto.FLOAT16, "b": TensorProto.FLOAT, "c": TensorProto.FLOAT}
    x = rng.normal(size=(3, 64)).astype(np.float32)
    y = onnx_session(path).run(["y"], {"x": x})[0]
    a16 = a.astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(y, (x @ a16) @ b + c, rtol=1e-5)


def test_cli_weights_fp16_export_proves_parity_and_records_storage(checkpoint, repository, tmp_path, capsys):
    from braintumor.export.fp16_storage import FP16_PARITY_TOLERANCES

    args = _export_parser().parse_args(["export", "--checkpoint", str(checkpoint[0]), "--out", str(tmp_path),
                                        "--weights-fp16", "--parity-data", str(checkpoint[1]), "--parity-count", "4",
                                        "--no-progress"])
    assert args.weights_fp16 and args.func(args) == 0
    assert "parity class_probs" in capsys.readouterr().out
    for name, outputs in zip(("brain_tumor", "brain_tumor_classifier"),
                             (contract.FULL_OUTPUTS, contract.CLASSIFIER_OUTPUTS)):
        folder = tmp_path / name / "1"
        meta = json.loads((folder / "metadata.json").read_text())
        assert meta["weights_storage"] == "float16"
        parity = meta["parity"]["onnxruntime_vs_pytorch"]
        assert [(p["name"], p["atol"], p["rtol"]) for p in parity] == [(n, *FP16_PARITY_TOLERANCES[n]) for n in outputs]
        assert [p["name"] for p in meta["parity"]["onnxruntime_fp32_weights_vs_pytorch"]] == list(outputs)
        verify_manifest(folder)
    out, published = repository
    assert json.loads((published[0].folder / "metadata.json").read_text())["weights_storage"] == "float32"


def test_evaluation_reports_the_ood_refer_rate_from_checkpoint_and_exported_model(repository, checkpoint, tmp_path):
    """`evaluate` on the validation split: the learned OOD check's refer rate (its false-refer rate there), the same
    through PyTorch and through the exported graph's ood_score, and in the combined refer policy."""
    from braintumor.export.evaluate import evaluate_repository
    from braintumor.train.evaluate import evaluate_checkpoint

    out, _ = repository
    ckpt, data = checkpoint
    exported = evaluate_repository(out, data, "val", tmp_path / "ort", progress=False)
    eager = evaluate_checkpoint(ckpt, data, "val", tmp_path / "torch", progress=False)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    for metrics in (exported, eager):
        ood = metrics["ood"]
        assert ood["threshold"] == state["ood"]["threshold"]
        assert ood["n_referred"] == round(ood["refer_rate"] * metrics["n"])
        assert "threshold+disagreement+ood" in metrics["refer_policies"]
    assert exported["ood"]["n_referred"] == eager["ood"]["n_referred"]
    assert exported["ood"]["max_score"] == pytest.approx(eager["ood"]["max_score"], rel=1e-3)
    assert json.loads((tmp_path / "ort" / "metrics.json").read_text())["ood"] == exported["ood"]


def test_ood_fit_saw_only_the_training_portion(checkpoint):
    """The OOD Gaussians and threshold come from the train split minus the validation keys, never from validation."""
    from braintumor.train.samples import build_index

    ckpt, data = checkpoint
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    cached = np.load(ckpt.parent / "ood_features.npz")
    train_keys, val_keys = set(cached["train_keys"].tolist()), set(state["val_keys"])
    assert val_keys and not train_keys & val_keys
    assert train_keys | val_keys == {s.key for s in build_index(data).split("train")}
    assert set(cached["val_keys"].tolist()) == val_keys  # measured only
    summary = state["calibration"]["ood"]
    assert summary["n_fit"] == len(train_keys) and summary["n_val"] == len(val_keys)
    assert state["ood_threshold"] == state["ood"]["threshold"] == summary["threshold"]


def test_the_bench_baseline_serves_a_checkpoint_through_its_contract(checkpoint):
    """loadtest/bench_baseline.py (bench_gateway's eager-PyTorch line) answers /analyze with the checkpoint's classes
    and refer rules, read through the one ModelContract."""
    pytest.importorskip("starlette.testclient")
    from starlette.testclient import TestClient

    from braintumor.loadtest.bench_baseline import baseline_app

    ckpt, data = checkpoint
    image = next(iter(sorted(data.rglob("*.jpg")))).read_bytes()
    with TestClient(baseline_app(str(ckpt))) as client:
        answer = client.post("/analyze", files={"image": ("slice.jpg", image, "image/jpeg")}, data={"heatmap": "true"})
    body = answer.json()
    assert answer.status_code == 200, body
    assert set(body["probabilities"]) == set(torch.load(ckpt, weights_only=False)["classes"])
    assert body["heatmap_png"] and isinstance(body["refer_reason"], list)
