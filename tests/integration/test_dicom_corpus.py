"""pydicom's own test corpus (the files its wheel ships) through the decoder and both front doors: no server error
anywhere, every file that decodes here is answered 200 by both doors and every file that does not is a clear 4xx
naming why; the outcome of each file goes into a table (printed with -s, written under the test's tmp dir).

The compressed syntaxes a PACS sends (JPEG Lossless process 14, JPEG-LS lossless and near-lossless, 12-bit JPEG
Extended, JPEG 2000, RLE, deflated, big-endian) must decode, and a refusal never says "no decoder" for them."""

from __future__ import annotations

from pathlib import Path

import pytest

pydicom = pytest.importorskip("pydicom")
import pydicom.data  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402

from braintumor.train.decode import ImageDecodeError, decode_any  # noqa: E402

# One file per syntax a PACS archive sends (all in pydicom's wheel), with the modality the decoder must report.
PACS_SYNTAXES = {
    "SC_rgb_jpeg_gdcm.dcm": "1.2.840.10008.1.2.4.70",  # JPEG Lossless, process 14 SV1
    "MR_small_jpeg_ls_lossless.dcm": "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "JPEGLSNearLossless_16.dcm": "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
    "JPGExtended.dcm": "1.2.840.10008.1.2.4.51",  # 12-bit JPEG Extended
    "MR_small_jp2klossless.dcm": "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "JPEG2000.dcm": "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "MR_small_RLE.dcm": "1.2.840.10008.1.2.5",  # RLE
    "image_dfl.dcm": "1.2.840.10008.1.2.1.99",  # deflated
    "MR_small_bigendian.dcm": "1.2.840.10008.1.2.2",  # big-endian
}
# Files whose pixel data really is broken (pydicom's README says so): "corrupt" is the right answer for them.
KNOWN_CORRUPT = {"JPEG-lossy.dcm": "non-conformant SOS (JPGExtended.dcm is its fixed copy)",
                 "JPEG2000-embedded-sequence-delimiter.dcm": "4 codestream bytes overwritten",
                 "MR_truncated.dcm": "truncated pixel data", "badVR.dcm": "an IS element of the image holds '1A'"}


def corpus() -> list[Path]:
    """Every file pydicom's wheel ships (get_testdata_files would also try to download pydicom-data's)."""
    return sorted(p for p in (Path(pydicom.data.__file__).parent / "test_files").rglob("*") if p.is_file())


def _local(path: Path) -> str:
    try:
        _, info = decode_any(path)
    except ImageDecodeError as exc:
        return "refused: " + str(exc).split(": ", 1)[-1][:90]
    return f"decoded ({info.modality or '-'}, {info.transfer_syntax})" if info else "decoded (raster)"


@pytest.mark.parametrize("name, uid", sorted(PACS_SYNTAXES.items()))
def test_every_syntax_a_pacs_sends_decodes(name, uid):
    path = Path(get_testdata_file(name))
    assert str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID) == uid
    decoded, info = decode_any(path)
    assert decoded.pixels.dtype.name == "uint8" and decoded.pixels.shape == (info.rows, info.columns)
    assert decoded.pixels.max() > decoded.pixels.min()  # real pixels, not a blank frame


def test_the_whole_corpus_decodes_or_is_refused_clearly():
    outcomes = {p.name: _local(p) for p in corpus()}
    assert len(outcomes) > 50
    # "no decoder" is said only for syntaxes we cannot decode; none of pydicom's files needs one we lack
    assert not [n for n, o in outcomes.items() if "no decoder" in o]
    wrong = [n for n, o in outcomes.items() if "corrupt" in o and "pixel data" in o and n not in KNOWN_CORRUPT]
    assert wrong == []


# -- both front doors -------------------------------------------------------------------------------------------------

@pytest.mark.integration
def test_corpus_through_both_front_doors(front_doors, tmp_path):
    from braintumor.clients import BrainTumorClient, BrainTumorError, InvalidInputError

    rows, problems = [], []
    clients = {proto: BrainTumorClient(url, protocol=proto, timeout=60) for proto, url in front_doors.items()}
    try:
        for path in corpus():
            local = _local(path)
            row = [path.name, local]
            for proto, client in clients.items():
                try:
                    result = client.analyze(path.read_bytes())
                    answer = f"200 {result.label}" + (" refer" if result.refer else "")
                    if local.startswith("refused"):
                        problems.append(f"{path.name} over {proto}: answered although the decoder refuses it")
                except InvalidInputError as exc:
                    answer = f"{exc.status or exc.code}"
                    if local.startswith("decoded"):
                        problems.append(f"{path.name} over {proto}: refused ({exc}) although it decodes")
                except BrainTumorError as exc:  # a server error, an upstream failure: never for an input
                    answer = f"ERROR {exc.status or exc.code}"
                    problems.append(f"{path.name} over {proto}: {type(exc).__name__} {exc}")
                row.append(answer)
            rows.append(row)
    finally:
        for client in clients.values():
            client.close()
    table = "\n".join(" | ".join(r) for r in [["file", "decoder", "grpc", "http"], *rows])
    (tmp_path / "corpus_outcomes.txt").write_text(table + "\n")
    print("\n" + table)
    assert problems == []
