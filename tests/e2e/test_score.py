"""`braintumor score` as a user runs it, against a real `braintumor serve` on the tiny model: real BRISC slices plus a
text file named .jpg (12 rows, 1 error, exit 1, --evaluate prints accuracy and Dice), and a run killed with SIGKILL
then rerun (every file once)."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("grpc")
pytest.importorskip("httpx")
pytest.importorskip("bentoml")

pytestmark = pytest.mark.e2e

CLASSES = ("glioma", "meningioma", "pituitary", "no_tumor")


def _cli(*args):
    return [sys.executable, "-m", "braintumor.serving.cli", "score", "--no-progress", *map(str, args)]


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _mini_brisc(real_data, root, per_class):
    """classification_task/train/<class>/ with ``per_class`` real slices each, and their masks."""
    masks = root / "segmentation_task" / "train" / "masks"
    masks.mkdir(parents=True)
    for label in CLASSES:
        folder = root / "classification_task" / "train" / label
        folder.mkdir(parents=True)
        for src in sorted((real_data / "classification_task" / "train" / label).glob("*.jpg"))[:per_class]:
            shutil.copy(src, folder / src.name)
            mask = real_data / "segmentation_task" / "train" / "masks" / f"{src.stem}.png"
            if mask.is_file():
                shutil.copy(mask, masks / mask.name)
    return root


def test_score_real_slices_with_a_bad_file_and_evaluate(served, real_data, tmp_path):
    root = _mini_brisc(real_data, tmp_path / "brisc", per_class=3)
    split = root / "classification_task" / "train"
    (split / "glioma" / "notes.jpg").write_text("this is a text file, not a JPEG\n")
    out = tmp_path / "s.csv"
    done = subprocess.run(_cli(split, "--out", out, "--url", served.grpc_target, "--concurrency", "4", "--evaluate"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    rows = _rows(out)
    assert len(rows) == 12 and {r["label"] for r in rows} <= set(CLASSES)
    assert all(abs(sum(float(r[f"prob_{c}"]) for c in CLASSES) - 1) < 1e-4 for r in rows)
    errors = _rows(tmp_path / "s.errors.csv")
    assert [(e["path"], e["kind"]) for e in errors] == [("glioma/notes.jpg", "invalid_input")]
    assert "12 of 13 files" in done.stdout and "1 failed" in done.stdout
    assert "accuracy:" in done.stdout and "mean Dice:" in done.stdout and "over 9 slices" in done.stdout
    assert len(list((tmp_path / "s.masks").rglob("*.png"))) == 12


def test_score_killed_then_rerun_over_http(served, real_data, tmp_path):
    root = tmp_path / "slices"
    for label in CLASSES:
        (root / label).mkdir(parents=True)
        for src in sorted((real_data / "classification_task" / "train" / label).glob("*.jpg"))[:20]:
            shutil.copy(src, root / label / src.name)
    out, masks = tmp_path / "r.jsonl", tmp_path / "masks"
    cmd = _cli(root, "--out", out, "--masks", masks, "--protocol", "http", "--url", served.http_url,
               "--concurrency", "1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (out.exists() and out.read_bytes().count(b"\n") >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = out.read_bytes().count(b"\n")
    assert 3 <= killed_at < 80
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"({80 - killed_at} scored now, {killed_at} before)" in done.stdout
    paths = [json.loads(line)["path"] for line in out.read_text().splitlines()]
    assert len(paths) == 80 == len(set(paths))
    assert len(list(masks.rglob("*.png"))) == 80 and not list(masks.rglob(".*"))
