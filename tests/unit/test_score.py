"""`braintumor score` building blocks without a server: file discovery, the append-only results file (torn last
line), the errors file, BRISC layout and label inference, and the numpy metrics behind --evaluate."""

import json
import os

import numpy as np
import pytest

from braintumor.clients.brisc_layout import detect_layout, label_from_name, true_label
from braintumor.clients.results import Analysis
from braintumor.clients.score import ScoreOptions, check_options
from braintumor.clients.score_discovery import Item, discover
from braintumor.clients.score_files import ErrorsFile, ResultsFile, UsageError, errors_path, result_columns, write_atomic
from braintumor.clients.scorer import row_for
from braintumor.clients.score_eval import classification_report, confusion, dice

CLASSES = ["glioma", "meningioma", "pituitary", "no_tumor"]


def _touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_discover_is_recursive_sorted_and_picks_images_and_dicom(tmp_path):
    _touch(tmp_path / "b" / "z.JPG")
    _touch(tmp_path / "b" / "a.png")
    _touch(tmp_path / "a.jpeg")
    _touch(tmp_path / "c" / "d" / "slice.dcm")
    _touch(tmp_path / "c" / "IM0001", b"\0" * 128 + b"DICM" + b"rest")  # extension-less DICOM: by its preamble
    _touch(tmp_path / "c" / "README", b"not an image at all, long enough to hold the preamble " * 4)
    _touch(tmp_path / "notes.txt")
    _touch(tmp_path / ".hidden.jpg")
    _touch(tmp_path / ".cache" / "x.jpg")
    _touch(tmp_path / "out" / "masks" / "m.png")  # an output folder inside INPUT is not rescanned
    items = discover(tmp_path, exclude=[tmp_path / "out"])
    assert [i.rel for i in items] == ["a.jpeg", "b/a.png", "b/z.JPG", "c/IM0001", "c/d/slice.dcm"]
    assert [i.mask_rel for i in items] == ["a.png", "b/a.png", "b/z.png", "c/IM0001.png", "c/d/slice.png"]


def test_discover_keeps_masks_apart_when_two_files_differ_only_by_extension(tmp_path):
    _touch(tmp_path / "x.jpg")
    _touch(tmp_path / "x.png")
    _touch(tmp_path / "y.jpg")
    assert [(i.rel, i.mask_rel) for i in discover(tmp_path)] == [("x.jpg", "x.jpg.png"), ("x.png", "x.png.png"),
                                                                  ("y.jpg", "y.png")]


def test_discover_one_file(tmp_path):
    f = _touch(tmp_path / "one.jpg")
    assert discover(f) == [Item(f, "one.jpg", "one.png")]


def _analysis(label="glioma", mm2=None, reasons=()):
    return Analysis(label=label, probabilities={c: (0.7 if c == label else 0.1) for c in CLASSES}, refer=bool(reasons),
                    refer_reason="; ".join(reasons) or None, tumor_area_px=12, tumor_area_mm2=mm2, mask_png=b"png",
                    heatmap_png=b"", overlay_png=None, model_name="toy", model_version="3", refer_reasons=reasons)


def _item(rel):
    return Item(None, rel, rel.rsplit(".", 1)[0] + ".png")


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_results_rows_roundtrip(tmp_path, fmt):
    out = tmp_path / f"r.{fmt}"
    results = ResultsFile(out, fmt, result_columns(CLASSES))
    results.open()
    results.append(row_for(_item("a/b, c.jpg"), _analysis(), CLASSES, "a/b, c.png"))
    results.append(row_for(_item("d.jpg"), _analysis("meningioma", 1.5, ("low confidence", "colour image")),
                           CLASSES, ""))
    results.close()
    rows = ResultsFile(out, fmt, result_columns(CLASSES)).read_done()
    assert [r["path"] for r in rows] == ["a/b, c.jpg", "d.jpg"]
    if fmt == "csv":
        lines = out.read_text().splitlines()
        assert lines[0] == ("path,label,prob_glioma,prob_meningioma,prob_pituitary,prob_no_tumor,refer,refer_reason,"
                            "tumor_area_px,tumor_area_mm2,model_name,model_version,mask")
        assert lines[1] == '"a/b, c.jpg",glioma,0.7,0.1,0.1,0.1,false,,12,,toy,3,"a/b, c.png"'
        assert lines[2] == "d.jpg,meningioma,0.1,0.7,0.1,0.1,true,low confidence; colour image,12,1.5,toy,3,"
    else:
        assert rows[1] == {"path": "d.jpg", "label": "meningioma", "prob_glioma": 0.1, "prob_meningioma": 0.7,
                           "prob_pituitary": 0.1, "prob_no_tumor": 0.1, "refer": True,
                           "refer_reason": ["low confidence", "colour image"], "tumor_area_px": 12,
                           "tumor_area_mm2": 1.5, "model_name": "toy", "model_version": "3", "mask": ""}
        assert rows[0]["tumor_area_mm2"] is None


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_torn_last_line_is_ignored_then_cut_before_appending(tmp_path, fmt):
    out = tmp_path / f"r.{fmt}"
    results = ResultsFile(out, fmt, result_columns(CLASSES))
    results.open()
    results.append(row_for(_item("a.jpg"), _analysis(), CLASSES, ""))
    results.close()
    whole = out.read_bytes()
    with open(out, "ab") as f:
        f.write(b'b.jpg,glio' if fmt == "csv" else b'{"path": "b.jpg", "lab')  # SIGKILL in the middle of a write
    results = ResultsFile(out, fmt, result_columns(CLASSES))
    assert [r["path"] for r in results.read_done()] == ["a.jpg"]
    assert out.read_bytes().startswith(whole) and len(out.read_bytes()) > len(whole)  # reading changes nothing
    results.open()
    assert out.read_bytes() == whole
    results.append(row_for(_item("b.jpg"), _analysis(), CLASSES, ""))
    results.close()
    assert [r["path"] for r in ResultsFile(out, fmt, result_columns(CLASSES)).read_done()] == ["a.jpg", "b.jpg"]


def test_torn_header_is_rewritten(tmp_path):
    out = tmp_path / "r.csv"
    out.write_bytes(b"path,lab")
    results = ResultsFile(out, "csv", result_columns(CLASSES))
    assert results.read_done() == []
    results.open()
    results.close()
    assert out.read_text() == ",".join(result_columns(CLASSES)) + "\n"


def test_results_of_another_model_are_refused(tmp_path):
    out = tmp_path / "r.csv"
    out.write_text("path,label,prob_a,prob_b\nx.jpg,a,1,0\n")
    with pytest.raises(UsageError, match="new --out"):
        ResultsFile(out, "csv", result_columns(CLASSES)).read_done()
    bad = tmp_path / "r.jsonl"
    bad.write_text('{"path": "x"}\nnot json\n')
    with pytest.raises(UsageError, match="line 2"):
        ResultsFile(bad, "jsonl", result_columns(CLASSES)).read_done()


def test_errors_file_is_created_on_the_first_failure_and_reset_per_run(tmp_path):
    path = errors_path(tmp_path / "results.csv")
    assert path.name == "results.errors.csv"
    errors = ErrorsFile(path)
    errors.reset()
    assert not path.exists()
    errors.add("a.jpg", "INVALID_ARGUMENT", "not a readable image;\nsend a JPEG")
    errors.close()
    assert path.read_text() == "path,kind,detail\na.jpg,INVALID_ARGUMENT,not a readable image; send a JPEG\n"
    ErrorsFile(path).reset()
    assert not path.exists()


def test_write_atomic_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "m" / "a.png"
    write_atomic(target, b"one")
    write_atomic(target, b"two")
    assert target.read_bytes() == b"two" and os.listdir(target.parent) == ["a.png"]


def test_stale_temporaries_are_removed_and_nothing_else(tmp_path):
    from braintumor.clients.score_files import remove_stale_temporaries

    for name in ("a/.x.png.123.tmp", ".y.png.9.tmp", "a/x.png", "a/.x.png", "notes.tmp"):
        _touch(tmp_path / name)
    assert remove_stale_temporaries(tmp_path) == 2
    assert not list(tmp_path.rglob("*.123.tmp")) and not list(tmp_path.rglob("*.9.tmp"))
    assert (tmp_path / "a" / "x.png").exists() and (tmp_path / "notes.tmp").exists()


@pytest.mark.parametrize("relpath, label", [
    ("glioma/brisc2025_train_00001_gl_ax_t1.jpg", "glioma"),
    ("train/no_tumor/whatever.jpg", "no_tumor"),  # the folder wins over the name
    ("classification_task/train/pituitary/brisc2025_train_00009_me_co_t1.jpg", "pituitary"),
    ("images/brisc2025_test_00012_me_sa_t1.jpg", "meningioma"),  # no class folder: the file name's code
    ("brisc2025_train_00003_no_ax_t1.jpg", "no_tumor"),
    ("BRISC2025_TRAIN_00003_NT_AX_T1.JPG", "no_tumor"),  # the README's `nt`, any case
    ("scans/patient1.jpg", None),
    ("brisc2025_train_00003_xx_ax_t1.jpg", None),
])
def test_true_label(relpath, label):
    assert true_label(relpath) == label


def test_label_from_name_needs_the_whole_grammar():
    assert label_from_name("brisc2025_train_00001_gl_ax_t1") == "glioma"
    assert label_from_name("brisc2025_train_00001_gl_ax_t2") is None


def _brisc(root, with_cls=True):
    for split in ("train", "test"):
        if with_cls:
            (root / "classification_task" / split / "glioma").mkdir(parents=True)
        (root / "segmentation_task" / split / "images").mkdir(parents=True)
        (root / "segmentation_task" / split / "masks").mkdir(parents=True)
    return root


def test_detect_layout(tmp_path):
    root = _brisc(tmp_path / "brisc")
    layout = detect_layout(root)
    assert layout.kind == "root" and layout.exclude == [root / "segmentation_task"]
    assert layout.mask_dirs == [root / "segmentation_task" / s / "masks" for s in ("test", "train")]

    split = detect_layout(root / "classification_task" / "train")
    assert split.kind == "classification_split"
    assert split.mask_dirs == [root / "segmentation_task" / "train" / "masks"] and split.exclude == []

    seg = detect_layout(root / "segmentation_task" / "test")
    assert seg.kind == "segmentation_split" and seg.exclude == seg.mask_dirs == [seg.mask_dirs[0]]

    seg_only = detect_layout(_brisc(tmp_path / "seg_only", with_cls=False))
    assert seg_only.kind == "root" and seg_only.exclude == seg_only.mask_dirs  # images scored, masks not
    assert detect_layout(tmp_path / "brisc" / "segmentation_task") is None


def test_check_options_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        check_options(ScoreOptions(tmp_path / "nope", tmp_path / "r.csv"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="holds no .jpg"):
        check_options(ScoreOptions(tmp_path / "empty", tmp_path / "r.csv"))
    _touch(tmp_path / "plain" / "a.jpg")
    with pytest.raises(UsageError, match="BRISC 2025 layout"):
        check_options(ScoreOptions(tmp_path / "plain", tmp_path / "r.csv", evaluate=True))
    with pytest.raises(UsageError, match="is a folder"):
        check_options(ScoreOptions(tmp_path / "plain", tmp_path))
    with pytest.raises(UsageError, match="concurrency"):
        check_options(ScoreOptions(tmp_path / "plain", tmp_path / "r.csv", concurrency=0))


def test_check_options_skips_outputs_inside_input(tmp_path):
    _touch(tmp_path / "a.jpg")
    _touch(tmp_path / "masks" / "a.png")
    items, layout = check_options(ScoreOptions(tmp_path, tmp_path / "r.csv", masks=tmp_path / "masks"))
    assert [i.rel for i in items] == ["a.jpg"] and layout is None


def test_confusion_and_accuracy():
    truths = ["glioma", "glioma", "meningioma", "no_tumor", "pituitary"]
    preds = ["glioma", "meningioma", "meningioma", "no_tumor", "glioma"]
    assert confusion(truths, preds, CLASSES).tolist() == [[1, 1, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]]
    report = classification_report(truths, preds, CLASSES)
    assert report["accuracy"] == 0.6
    assert report["recall"] == {"glioma": 0.5, "meningioma": 1.0, "pituitary": 0.0, "no_tumor": 1.0}
    assert classification_report([], [], CLASSES)["accuracy"] is None
    assert classification_report(["glioma"], ["glioma"], CLASSES)["recall"]["pituitary"] is None


@pytest.mark.parametrize("pred, truth, expected", [
    ([[1, 1], [0, 0]], [[1, 0], [0, 0]], 2 * 1 / 3),
    ([[1, 1], [1, 1]], [[1, 1], [1, 1]], 1.0),
    ([[0, 0], [0, 0]], [[0, 0], [0, 0]], 1.0),  # empty / empty agree
    ([[0, 0], [0, 0]], [[1, 0], [0, 0]], 0.0),
    ([[1, 0], [0, 0]], [[0, 0], [0, 1]], 0.0),
])
def test_dice(pred, truth, expected):
    assert dice(np.array(pred), np.array(truth)) == pytest.approx(expected)


def test_dice_refuses_different_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        dice(np.zeros((2, 2)), np.zeros((3, 2)))


def test_jsonl_row_is_one_line(tmp_path):
    out = tmp_path / "r.jsonl"
    results = ResultsFile(out, "jsonl", result_columns(CLASSES))
    results.open()
    results.append(row_for(_item("ä\u2028.jpg"), _analysis(reasons=("a\nb",)), CLASSES, ""))
    results.close()
    assert out.read_bytes().count(b"\n") == 1 and json.loads(out.read_text())["path"] == "ä\u2028.jpg"


def test_score_command_has_help_for_every_option_and_imports_only_the_client_layer():
    import argparse
    import subprocess
    import sys

    from braintumor.clients.score_commands import register

    sub = argparse.ArgumentParser().add_subparsers()
    register(sub)
    parser = sub.choices["score"]
    assert all(a.help for a in parser._actions if a.dest != "help")
    code = ("import sys, braintumor.clients.score, braintumor.clients.score_commands, braintumor.clients.aio; "
            "print(sorted(m for m in sys.modules if m.startswith('braintumor.') and not "
            "m.startswith('braintumor.clients')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
