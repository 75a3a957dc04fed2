"""The committed gRPC stubs are what the proto generates, and the wire contract stands alone (no serving, no torch)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

CLIENTS = Path(__file__).resolve().parents[2] / "clients"


def test_committed_stubs_are_up_to_date(tmp_path):
    pytest.importorskip("grpc_tools", reason="regenerating the stubs needs grpcio-tools (dev extra)")
    from braintumor.clients.v1 import generate

    for path in generate.generate(tmp_path):
        committed = generate.HERE / path.name
        assert committed.read_bytes() == path.read_bytes(), (
            f"clients/v1/{path.name} is stale: run `python -m braintumor.clients.v1.generate` and commit the result")


def test_stubs_import_without_serving_or_torch():
    code = ("import sys; from braintumor.clients.v1 import braintumor_pb2, braintumor_pb2_grpc; "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith(('braintumor.', 'torch')))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert set(loaded) == {"braintumor.clients", "braintumor.clients.v1", "braintumor.clients.v1.braintumor_pb2",
                           "braintumor.clients.v1.braintumor_pb2_grpc"}


@pytest.mark.parametrize("path", sorted(CLIENTS.rglob("*.py")), ids=lambda p: str(p.relative_to(CLIENTS)))
def test_clients_import_nothing_else_of_ours(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names = [node.module or ""] if node.level == 0 else []
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            assert not name.startswith(("braintumor.train", "braintumor.export", "braintumor.serving", "torch")), (
                f"{path.name} imports {name}: clients/ is the wire contract and must install alone")


def test_service_shape():
    from braintumor.clients.v1 import braintumor_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["BrainTumor"]
    assert service.full_name == "braintumor.v1.BrainTumor"
    methods = {m.name: (m.client_streaming, m.server_streaming) for m in service.methods}
    assert methods == {"Analyze": (False, False), "AnalyzeStream": (True, True), "Explain": (False, False),
                       "GetModelInfo": (False, False)}
    response = pb.AnalyzeResponse()
    assert not response.HasField("tumor_area_mm2")  # optional: "unknown" is not 0 mm²
    assert not pb.ModelInfo().HasField("refer_threshold")
