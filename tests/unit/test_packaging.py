"""The wheel maps the top-level layer folders into the `braintumor` package (editable installs are what tests use)."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_installs_layers_under_braintumor(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
                    str(ROOT)], check=True)
    wheel = next(tmp_path.glob("braintumor-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("train/preprocess.py", "train/trainer/engine.py", "serving/cli.py", "export/python_backend/model.py",
                   "clients/__init__.py", "loadtest/commands.py", "loadtest/locustfile_http.py"):
        assert f"braintumor/{module}" in names, module
    assert not any(n.startswith(("train/", "serving/", "loadtest/", "tests/")) for n in names)  # no bare top-level modules
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    # loadtest reaches the `braintumor` command as a plugin (serving/cli.py never names it)
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "[braintumor.commands]\nloadtest = braintumor.loadtest.commands" in entry_points
    # COCO RLE masks: the SDK decodes them, the server encodes them (the serve extra gets it through braintumor[dicom],
    # the SDK's DICOM results, which the server answers with dicom=true, and which brings braintumor[client]).
    assert 'Requires-Dist: pycocotools>=2.0.8; extra == "client"' in metadata
    assert 'Requires-Dist: braintumor[dicom]; extra == "serve"' in metadata
    assert 'Requires-Dist: braintumor[client]; extra == "dicom"' in metadata
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True)
    # -S: no site-packages, so the editable install cannot answer; only the wheel's files are importable.
    code = "import braintumor.train.naming as n, braintumor.serving as s; print(n.__file__); print(n.CLASSES[3])"
    out = subprocess.run([sys.executable, "-S", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); {code}"],
                         capture_output=True, text=True, check=True).stdout
    assert str(target) in out and "no_tumor" in out
