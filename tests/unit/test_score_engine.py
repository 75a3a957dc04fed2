"""The `braintumor score` engine against a real in-process gRPC server (a small servicer built on the generated
stubs, no Triton): rows and masks, the errors file and exit codes, bounded concurrency, resume after a torn line,
Ctrl-C, the service going down, SIGKILL of the command, and --evaluate on a tiny BRISC-shaped folder."""

import csv
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent import futures

import numpy as np
import pytest

grpc = pytest.importorskip("grpc")

from PIL import Image  # noqa: E402

from braintumor.clients import scorer  # noqa: E402
from braintumor.clients.masks import encode_rle, mask_png  # noqa: E402
from braintumor.clients.score import ScoreOptions, run_score  # noqa: E402
from braintumor.clients.v1 import braintumor_pb2 as pb  # noqa: E402
from braintumor.clients.v1 import braintumor_pb2_grpc as pb_grpc  # noqa: E402

CLASSES = ["glioma", "meningioma", "pituitary", "no_tumor"]
SIDE = 8


def _png(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def predicted_mask(label: str) -> np.ndarray:
    """What the toy service answers: the top half for a tumour class, nothing for no_tumor."""
    mask = np.zeros((SIDE, SIDE), np.uint8)
    if label != "no_tumor":
        mask[: SIDE // 2] = 255
    return mask


class ToyService(pb_grpc.BrainTumorServicer):
    """Image bytes are a script: the first line names the class to answer (else glioma); b"BAD..." is refused as
    INVALID_ARGUMENT; while ``down`` every call is UNAVAILABLE. ``delay`` slows each call; ``on_call(n)`` runs at
    the n-th call. The mask (``mask_for(label)``) comes in the asked mask_format, as the real server encodes it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls = self.running = self.most_running = 0
        self.delay = 0.0
        self.down = False
        self.on_call = None
        self.mask_for = predicted_mask
        self.mask_formats: list[str] = []

    def GetModelInfo(self, request, context):
        if self.down:
            context.abort(grpc.StatusCode.UNAVAILABLE, "Triton is not reachable")
        return pb.ModelInfo(name="toy", version="3", classes=CLASSES, image_size=32, geometry="crop_pad")

    def Analyze(self, request, context):
        with self.lock:
            self.calls += 1
            n = self.calls
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        try:
            if self.on_call is not None:
                self.on_call(n)
            time.sleep(self.delay)
            if self.down:
                context.abort(grpc.StatusCode.UNAVAILABLE, "Triton is not reachable")
            if request.image.startswith(b"BAD"):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "not a readable image; send a JPEG, PNG or DICOM")
            first = request.image.split(b"\n")[0].decode(errors="replace")
            label = first if first in CLASSES else "glioma"
            refer = label == "meningioma"
            mask = self.mask_for(label) > 0
            with self.lock:
                self.mask_formats.append(request.mask_format)
            rle = request.mask_format == "rle"
            return pb.AnalyzeResponse(
                label=label, probabilities={c: (0.7 if c == label else 0.1) for c in CLASSES}, refer=refer,
                refer_reason=["the top probability is under the refer threshold"] if refer else [],
                tumor_area_px=int(mask.sum()), mask_png=b"" if rle else mask_png(mask),
                mask_rle=pb.MaskRle(**encode_rle(mask)) if rle else None,
                heatmap_png=_png(np.full((*mask.shape, 3), 7, np.uint8)) if request.heatmap else b"",
                image_height=mask.shape[0], image_width=mask.shape[1], model=pb.ModelRef(name="toy", version="3"))
        finally:
            with self.lock:
                self.running -= 1


@pytest.fixture
def toy():
    service = ToyService()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    pb_grpc.add_BrainTumorServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    service.url = f"127.0.0.1:{port}"
    try:
        yield service
    finally:
        server.stop(0)


def _files(root, labels, bad=()):
    root.mkdir(parents=True, exist_ok=True)
    for i, label in enumerate(labels):
        (root / f"s{i:02d}.jpg").write_bytes(label.encode() + b"\nslice")
    for name in bad:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"BAD: this is a text file")
    return root


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _opts(service, root, out, **kw):
    return ScoreOptions(input=root, out=out, url=service.url, retries=0, progress=False, **kw)


def test_scores_every_file_writes_masks_and_records_failures(toy, tmp_path, capsys):
    root = _files(tmp_path / "in", ["glioma", "meningioma", "no_tumor"] * 3, bad=["sub/broken.jpg"])
    out = tmp_path / "out" / "results.csv"
    code = run_score(_opts(toy, root, out, masks=tmp_path / "masks", concurrency=4))
    assert code == 1
    rows = _rows(out)
    assert sorted(r["path"] for r in rows) == [f"s{i:02d}.jpg" for i in range(9)]
    row = next(r for r in rows if r["path"] == "s01.jpg")
    assert row["label"] == "meningioma" and row["prob_meningioma"] == "0.7" and row["refer"] == "true"
    assert row["refer_reason"] == "the top probability is under the refer threshold"
    assert row["tumor_area_px"] == "32" and row["tumor_area_mm2"] == "" and row["model_version"] == "3"
    assert row["mask"] == "s01.png"
    assert np.array_equal(np.asarray(Image.open(tmp_path / "masks" / "s01.png")), predicted_mask("meningioma"))
    with open(out.with_name("results.errors.csv"), newline="") as f:
        errors = list(csv.DictReader(f))
    assert errors == [{"path": "sub/broken.jpg", "kind": "invalid_input",
                       "detail": "INVALID_ARGUMENT: not a readable image; send a JPEG, PNG or DICOM"}]
    said = capsys.readouterr()
    assert "9 of 10 files" in said.out and "1 failed" in said.out and "results.errors.csv" in said.err

    # The rerun retries only the failed file; once it is fixed, everything is in and the errors file is gone.
    (root / "sub" / "broken.jpg").write_bytes(b"pituitary\nfixed")
    calls = toy.calls
    assert run_score(_opts(toy, root, out, masks=tmp_path / "masks")) == 0
    assert toy.calls == calls + 1
    assert len(_rows(out)) == 10 and not out.with_name("results.errors.csv").exists()
    assert (tmp_path / "masks" / "sub" / "broken.png").is_file()


def test_concurrency_is_bounded(toy, tmp_path):
    toy.delay = 0.05
    root = _files(tmp_path / "in", ["glioma"] * 12)
    assert run_score(_opts(toy, root, tmp_path / "r.jsonl", concurrency=3)) == 0
    assert toy.most_running == 3
    lines = (tmp_path / "r.jsonl").read_text().splitlines()
    assert len(lines) == 12 and json.loads(lines[0])["prob_glioma"] == 0.7


def test_resume_skips_rows_present_and_cuts_a_torn_line(toy, tmp_path):
    root = _files(tmp_path / "in", ["glioma", "pituitary", "no_tumor", "meningioma"])
    out = tmp_path / "r.csv"
    assert run_score(_opts(toy, root, out)) == 0
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:3]) + lines[3][:7])  # header, 2 rows, a row torn by SIGKILL
    calls = toy.calls
    assert run_score(_opts(toy, root, out)) == 0
    assert toy.calls == calls + 2
    rows = _rows(out)
    assert sorted(r["path"] for r in rows) == ["s00.jpg", "s01.jpg", "s02.jpg", "s03.jpg"]
    assert run_score(_opts(toy, root, out)) == 0 and toy.calls == calls + 2  # all done: nothing sent


def test_ctrl_c_stops_submitting_and_the_rerun_finishes(toy, tmp_path, capsys):
    toy.delay = 0.05
    root = _files(tmp_path / "in", ["glioma"] * 20)
    out = tmp_path / "r.csv"
    toy.on_call = lambda n: os.kill(os.getpid(), signal.SIGINT) if n == 3 else None
    assert run_score(_opts(toy, root, out, concurrency=2)) == 130
    done = len(_rows(out))
    assert 2 <= done <= 4  # the calls in flight finished, nothing new was started
    assert "rerun the same command" in capsys.readouterr().err
    toy.on_call = None
    assert run_score(_opts(toy, root, out, concurrency=2)) == 0
    paths = [r["path"] for r in _rows(out)]
    assert len(paths) == 20 == len(set(paths))


def test_service_down_stops_the_run_without_damage(toy, tmp_path, capsys):
    root = _files(tmp_path / "in", ["glioma"] * 10)
    out = tmp_path / "r.csv"
    toy.down = True
    assert run_score(_opts(toy, root, out)) == 3
    assert not out.exists()
    assert "is not available" in capsys.readouterr().err

    toy.down = False
    toy.on_call = lambda n: setattr(toy, "down", True) if n == 4 else None  # goes down mid-run
    assert run_score(_opts(toy, root, out, concurrency=1)) == 3
    assert len(_rows(out)) == 3 and not out.with_name("r.errors.csv").exists()  # not the files' fault
    assert "stopped early with 7 files left" in capsys.readouterr().err
    toy.down, toy.on_call = False, None
    assert run_score(_opts(toy, root, out)) == 0 and len(_rows(out)) == 10


def test_nothing_listens(tmp_path, capsys):
    from braintumor.serving.triton_embedded import free_port

    root = _files(tmp_path / "in", ["glioma"])
    opts = ScoreOptions(input=root, out=tmp_path / "r.csv", url=f"127.0.0.1:{free_port()}", retries=0, timeout=5,
                        progress=False)
    assert run_score(opts) == 3
    assert "Start it (`braintumor serve`)" in capsys.readouterr().err and not (tmp_path / "r.csv").exists()


def _cli(*args):
    return [sys.executable, "-m", "braintumor.serving.cli", "score", *map(str, args)]


def test_sigkill_then_rerun_loses_and_duplicates_nothing(toy, tmp_path):
    toy.delay = 0.05
    gate = threading.Event()
    toy.on_call = lambda n: gate.wait(60) if n > 8 else None  # the run cannot finish before it is killed
    root = _files(tmp_path / "in", ["glioma", "meningioma"] * 15)
    out, masks = tmp_path / "r.csv", tmp_path / "masks"
    cmd = _cli(root, "--out", out, "--masks", masks, "--url", toy.url, "--concurrency", "2", "--no-progress")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (out.exists() and len(out.read_text().splitlines()) >= 6):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        gate.set()
    killed_at = len(_rows(out))
    assert 5 <= killed_at <= 8
    (masks / ".s29.png.12345.tmp").write_bytes(b"half a PNG")  # as a kill between write and rename leaves it
    toy.delay, toy.on_call = 0, None
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    paths = [r["path"] for r in _rows(out)]
    assert sorted(paths) == [f"s{i:02d}.jpg" for i in range(30)]
    assert sorted(p.name for p in masks.iterdir()) == [f"s{i:02d}.png" for i in range(30)]  # no temporary files


def test_cli_usage_errors(tmp_path):
    done = subprocess.run(_cli(tmp_path / "missing", "--out", tmp_path / "r.csv"), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and "missing does not exist" in done.stderr


def _brisc(root):
    """classification_task/train/<class>/ with two slices per class, masks for the tumour ones."""
    gt = np.zeros((SIDE, SIDE), np.uint8)
    gt[: SIDE // 2, : SIDE // 2] = 200  # soft-edged masks are thresholded at 128
    codes = {"glioma": "gl", "meningioma": "me", "pituitary": "pi", "no_tumor": "no"}
    masks = root / "segmentation_task" / "train" / "masks"
    masks.mkdir(parents=True)
    index = 0
    for label, code in codes.items():
        folder = root / "classification_task" / "train" / label
        folder.mkdir(parents=True)
        for answer in (label, "glioma"):  # the second slice of each class is answered glioma
            index += 1
            stem = f"brisc2025_train_{index:05d}_{code}_ax_t1"
            (folder / f"{stem}.jpg").write_bytes(answer.encode() + b"\n")
            if label != "no_tumor":
                (masks / f"{stem}.png").write_bytes(_png(gt))
    return root


def test_evaluate_on_a_brisc_split(toy, tmp_path, capsys):
    root = _brisc(tmp_path / "brisc")
    out = tmp_path / "s.csv"
    assert run_score(_opts(toy, root / "classification_task" / "train", out, evaluate=True)) == 0
    said = capsys.readouterr().out
    report = json.loads((tmp_path / "s.eval.json").read_text())
    cls, seg = report["classification"], report["segmentation"]
    assert cls["accuracy"] == pytest.approx(5 / 8)  # glioma 2/2, the others 1/2
    assert cls["recall"] == {"glioma": 1.0, "meningioma": 0.5, "pituitary": 0.5, "no_tumor": 0.5}
    assert cls["confusion"][3] == [1, 0, 0, 1]
    # Predicted: the top half (32 px); truth: the top-left quarter (16 px): Dice 2*16/48 on all six tumour slices.
    assert seg["n"] == 6 and seg["mean_dice"] == pytest.approx(2 / 3)
    assert seg["no_tumor_with_mask"] == {"n": 2, "rate": 0.5}
    assert "accuracy: 62.5%" in said and "mean Dice: 0.667" in said
    assert (tmp_path / "s.masks" / "glioma").is_dir()  # --evaluate without --masks keeps them next to --out

    # From the root, the segmentation images are not scored twice and the masks are not scored at all.
    calls = toy.calls
    assert run_score(_opts(toy, root, tmp_path / "root.csv", evaluate=True)) == 0
    assert toy.calls == calls + 8


def _ellipse(label: str) -> np.ndarray:
    """A non-square slice with an elliptic tumour (none for no_tumor): runs of many lengths in both formats."""
    yy, xx = np.mgrid[0:61, 0:47]
    inside = ((yy - 25) / 13.0) ** 2 + ((xx - 20) / 9.0) ** 2 <= 1.0
    return np.where(inside & (label != "no_tumor"), 255, 0).astype(np.uint8)


def test_masks_asked_as_rle_are_the_same_files_as_png_masks(toy, tmp_path, monkeypatch):
    """score asks for COCO RLE (the server encodes no PNG) and writes the PNG itself: the mask files and the rows
    are byte for byte what asking for the server's PNG gives."""
    toy.mask_for = _ellipse
    root = _files(tmp_path / "in", ["glioma", "meningioma", "no_tumor", "pituitary"])
    assert scorer.MASK_FORMAT == "rle"
    assert run_score(_opts(toy, root, tmp_path / "rle.csv", masks=tmp_path / "rle")) == 0
    assert toy.mask_formats == ["rle"] * 4
    monkeypatch.setattr(scorer, "MASK_FORMAT", "png")
    assert run_score(_opts(toy, root, tmp_path / "png.csv", masks=tmp_path / "png")) == 0
    assert toy.mask_formats[4:] == [""] * 4  # the SDK's default: the field left empty, a PNG answered

    files = sorted(p.relative_to(tmp_path / "png").as_posix() for p in (tmp_path / "png").rglob("*"))
    assert files == ["s00.png", "s01.png", "s02.png", "s03.png"]
    for name in files:
        assert (tmp_path / "rle" / name).read_bytes() == (tmp_path / "png" / name).read_bytes(), name
    assert np.array_equal(np.asarray(Image.open(tmp_path / "rle" / "s00.png")), _ellipse("glioma"))
    assert not np.asarray(Image.open(tmp_path / "rle" / "s02.png")).any()  # no_tumor: an empty mask
    assert sorted(_rows(tmp_path / "rle.csv"), key=lambda r: r["path"]) == \
        sorted(_rows(tmp_path / "png.csv"), key=lambda r: r["path"])


def test_heatmaps_only_when_asked(toy, tmp_path):
    from braintumor.clients.score_files import UsageError

    root = _files(tmp_path / "in", ["glioma", "pituitary"])
    assert run_score(_opts(toy, root, tmp_path / "plain.csv")) == 0  # without --heatmaps: no heatmap asked
    assert run_score(_opts(toy, root, tmp_path / "r.csv", heatmaps=tmp_path / "heat")) == 0
    written = sorted(p.relative_to(tmp_path / "heat").as_posix() for p in (tmp_path / "heat").rglob("*.png"))
    assert written == ["s00.png", "s01.png"]
    assert np.asarray(Image.open(tmp_path / "heat" / "s00.png")).shape == (SIDE, SIDE, 3)
    with pytest.raises(UsageError, match="2 rows of .* have no heatmap"):
        run_score(_opts(toy, root, tmp_path / "plain.csv", heatmaps=tmp_path / "heat2"))


def test_masks_asked_for_after_a_run_without_them_is_refused(toy, tmp_path):
    from braintumor.clients.score_files import UsageError

    root = _files(tmp_path / "in", ["glioma", "pituitary"])
    out = tmp_path / "r.jsonl"
    assert run_score(_opts(toy, root, out)) == 0
    with pytest.raises(UsageError, match="2 rows of .* have no mask"):
        run_score(_opts(toy, root, out, masks=tmp_path / "masks"))
    assert len(out.read_text().splitlines()) == 2  # untouched
