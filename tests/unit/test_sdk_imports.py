"""The SDK installs and imports without torch, onnxruntime, bentoml or any other layer of ours."""

import subprocess
import sys

BLOCKED = ("torch", "onnxruntime", "bentoml", "tritonclient", "braintumor.serving", "braintumor.train",
           "braintumor.export")

SCRIPT = f"""
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in {BLOCKED!r}):
            raise ImportError(f"blocked import of {{name}}")
        return None

sys.meta_path.insert(0, Block())
import braintumor.clients
from braintumor.clients import AsyncBrainTumorClient, BrainTumorClient, InvalidInputError
client = BrainTumorClient("localhost:1", protocol="http")
client.close()
print("ok")
"""


def test_clients_import_without_heavy_or_server_dependencies():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_stub_package_does_not_load_the_sdk():
    """The server imports the stubs (braintumor.clients.v1); that must not pull in httpx or tenacity."""
    script = ("import sys, braintumor.clients.v1.braintumor_pb2; "
              "print('httpx' in sys.modules, 'tenacity' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]
