import io

import numpy as np
import pytest
from PIL import Image

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.uid import (  # noqa: E402
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLSLossless, MRImageStorage, RLELossless, generate_uid,
)

from braintumor.train.decode import (  # noqa: E402
    DicomInfo, ImageDecodeError, decode_any, decode_dicom, decode_image, is_dicom,
)

PATIENT = "Doe^Jane"
PATIENT_ID = "PID-98765"
BIRTH_DATE = "19700101"


def _dataset(pixels: np.ndarray | None, photometric="MONOCHROME2", bits_stored=None, **tags) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.PatientName = PATIENT
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = BIRTH_DATE
    ds.StudyDate = "20240102"
    if pixels is not None:
        bits = bits_stored or pixels.dtype.itemsize * 8
        ds.set_pixel_data(pixels, photometric, bits, generate_instance_uid=False)
    else:
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 16, 16, 1, photometric
    for key, value in tags.items():
        setattr(ds, key, value)
    return ds


def _bytes(ds: Dataset, enforce=True) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=enforce)
    return buf.getvalue()


def _dicom(pixels, **kw) -> bytes:
    return _bytes(_dataset(pixels, **kw))


# Stored values 0..350 in steps of 50; slope 2, intercept -100 gives -100..600. The LINEAR window
# center 300, width 401 maps x to ((x - 299.5) / 400 + 0.5) * 255, clipped: 0 at <= 99.5, 255 above 499.5.
STORED_ROW = np.arange(0, 400, 50, dtype=np.uint16)
WINDOWED_ROW = [0, 0, 0, 64, 128, 192, 255, 255]


def test_monochrome2_16bit_rescale_and_window_to_uint8():
    stored = np.tile(STORED_ROW, (8, 1))
    data = _dicom(stored, RescaleSlope=2, RescaleIntercept=-100, WindowCenter=300, WindowWidth=401)
    decoded, info = decode_dicom(data)
    assert decoded.pixels.dtype == np.uint8 and decoded.pixels.shape == (8, 8)
    np.testing.assert_array_equal(decoded.pixels[0], WINDOWED_ROW)
    assert not decoded.is_colour and decoded.mode == "I;16"
    assert info.rescale == (2.0, -100.0) and info.window == (300.0, 401.0)
    assert info.photometric_interpretation == "MONOCHROME2" and info.modality == "MR"


def test_multi_valued_window_uses_the_first():
    stored = np.tile(STORED_ROW, (8, 1))
    data = _dicom(stored, RescaleSlope=2, RescaleIntercept=-100, WindowCenter=[300, 40], WindowWidth=[401, 80])
    decoded, info = decode_dicom(data)
    np.testing.assert_array_equal(decoded.pixels[0], WINDOWED_ROW)
    assert info.window == (300.0, 401.0)


def test_no_window_scales_min_max_after_rescale():
    stored = np.tile(np.array([10, 20, 30, 40, 50, 60, 70, 1030], np.uint16), (8, 1))
    decoded, info = decode_dicom(_dicom(stored, RescaleSlope=1, RescaleIntercept=-1024))
    expected = np.rint((stored[0].astype(float) - 10) * 255 / 1020).astype(np.uint8)
    np.testing.assert_array_equal(decoded.pixels[0], expected)
    assert info.window is None


def test_signed_pixels_with_window():
    stored = np.tile(np.array([-1000, -200, -100, 0, 100, 200, 300, 1000], np.int16), (8, 1))
    decoded, _ = decode_dicom(_dicom(stored, WindowCenter=0, WindowWidth=201))
    # 0 at <= -100.5, else ((x + 0.5) / 200 + 0.5) * 255: -100 -> 0.64 -> 1, 0 -> 128.1, 100 -> 255.6 -> 255
    np.testing.assert_array_equal(decoded.pixels[0], [0, 0, 1, 128, 255, 255, 255, 255])


def test_monochrome1_is_inverted():
    stored = np.tile(np.array([0, 100, 200, 300, 400, 500, 600, 1020], np.uint16), (8, 1))
    mono1, info = decode_dicom(_dicom(stored, photometric="MONOCHROME1"))
    mono2, _ = decode_dicom(_dicom(stored, photometric="MONOCHROME2"))
    np.testing.assert_array_equal(mono1.pixels, 255 - mono2.pixels)
    assert mono1.pixels[0, 0] == 255 and mono1.pixels[0, -1] == 0
    assert info.photometric_interpretation == "MONOCHROME1"


def test_8bit_monochrome_without_window_keeps_full_range_values():
    grey = np.zeros((12, 10), np.uint8)
    grey[3:9, 2:8] = 200
    grey[0, 0] = 30
    decoded, info = decode_dicom(_dicom(grey))
    np.testing.assert_array_equal(decoded.pixels, grey)
    assert decoded.mode == "L" and info.bits_stored == 8


def test_pixel_spacing_is_read_as_row_then_column():
    _, info = decode_dicom(_dicom(np.zeros((8, 8), np.uint8), PixelSpacing=[0.5, 0.75]))
    assert info.pixel_spacing_mm == (0.5, 0.75)
    _, info = decode_dicom(_dicom(np.zeros((8, 8), np.uint8)))
    assert info.pixel_spacing_mm is None


def test_spacing_from_shared_functional_groups():
    measures = Dataset()
    measures.PixelSpacing = [0.9, 0.8]
    group = Dataset()
    group.PixelMeasuresSequence = [measures]
    _, info = decode_dicom(_dicom(np.zeros((8, 8), np.uint8), SharedFunctionalGroupsSequence=[group]))
    assert info.pixel_spacing_mm == (0.9, 0.8)


def test_multi_frame_decodes_the_middle_frame():
    frames = np.zeros((5, 8, 8), np.uint8)
    for k in range(5):
        frames[k, k] = 10 * (k + 1)  # frame k: row k lit at level 10(k+1)
    decoded, info = decode_dicom(_dicom(frames))
    assert info.number_of_frames == 5 and info.frame_index == 2
    np.testing.assert_array_equal(decoded.pixels, frames[2])  # 8-bit, no window: as stored


def test_rgb_dicom_sets_the_colour_flag():
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    decoded, info = decode_dicom(_dicom(photo, photometric="RGB"))
    assert decoded.is_colour and decoded.mode == "RGB" and decoded.pixels.shape == (16, 16)
    assert info.photometric_interpretation == "RGB"
    grey = np.stack([np.arange(256, dtype=np.uint8).reshape(16, 16)] * 3, -1)
    decoded, _ = decode_dicom(_dicom(grey, photometric="RGB"))
    assert not decoded.is_colour
    np.testing.assert_array_equal(decoded.pixels, grey[..., 0])


def test_missing_pixel_data_is_a_clear_error():
    with pytest.raises(ImageDecodeError, match="no PixelData.*send a DICOM image with PixelData"):
        decode_dicom(_dicom(None))
    with pytest.raises(ImageDecodeError, match="no PixelData"):
        decode_image(_dicom(None))


@pytest.mark.parametrize(
    "tags, fragment",
    [
        ({"PhotometricInterpretation": "PALETTE COLOR"}, "'PALETTE COLOR' is not supported"),
        ({"Rows": 4, "Columns": 4}, "at least 8x8"),
        ({"Rows": 30000, "Columns": 30000}, "too large"),
    ],
)
def test_unsupported_or_absurd_headers_are_refused(tags, fragment):
    with pytest.raises(ImageDecodeError, match=fragment):
        decode_dicom(_dicom(np.zeros((8, 8), np.uint8), **tags))


def test_truncated_pixel_data_is_a_clear_error():
    data = _dicom(np.zeros((64, 64), np.uint16))
    with pytest.raises(ImageDecodeError, match="DICOM"):
        decode_dicom(data[:-3000])


@pytest.mark.parametrize(
    "syntax, fragment",
    [(JPEGLSLossless, "corrupt JPEG-LS Lossless"), (RLELossless, "corrupt RLE"),
     # High-Throughput JPEG 2000: pydicom decodes it only with pylibjpeg-openjpeg, which the serve extra leaves out
     ("1.2.840.10008.1.2.4.201",
      "no decoder here for DICOM transfer syntax High-Throughput JPEG 2000 .*pylibjpeg-openjpeg")],
)
def test_compressed_pixel_data_errors_say_why(syntax, fragment):
    ds = _dataset(np.zeros((8, 8), np.uint8))
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([b"not a compressed frame"])
    ds["PixelData"].VR = "OB"
    with pytest.raises(ImageDecodeError, match=fragment):
        decode_dicom(_bytes(ds))


def test_decode_image_dispatches_dicom_bytes_and_files(tmp_path):
    stored = np.tile(STORED_ROW, (8, 1))
    data = _dicom(stored, RescaleSlope=2, RescaleIntercept=-100, WindowCenter=300, WindowWidth=401)
    np.testing.assert_array_equal(decode_image(data).pixels[0], WINDOWED_ROW)
    path = tmp_path / "slice.dcm"
    path.write_bytes(data)
    np.testing.assert_array_equal(decode_image(path).pixels[0], WINDOWED_ROW)
    decoded, info = decode_any(path)
    assert isinstance(info, DicomInfo)
    np.testing.assert_array_equal(decoded.pixels[0], WINDOWED_ROW)


def test_decode_any_returns_no_info_for_png():
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8)
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="PNG")
    decoded, info = decode_any(buf.getvalue())
    assert info is None
    np.testing.assert_array_equal(decoded.pixels, grey)


def test_is_dicom():
    ds = _dataset(np.zeros((8, 8), np.uint8))
    assert is_dicom(_bytes(ds))
    # A bare dataset (no preamble, no file meta), as some PACS exports write it.
    bare = Dataset()
    bare.update(ds)
    bare_bytes = io.BytesIO()
    pydicom.dcmwrite(bare_bytes, bare, implicit_vr=True, little_endian=True)
    assert bare_bytes.getvalue()[:2] == b"\x08\x00"
    assert is_dicom(bare_bytes.getvalue())
    decoded, _ = decode_dicom(bare_bytes.getvalue())
    assert decoded.pixels.shape == (8, 8)
    png = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(png, format="PNG")
    for data in (png.getvalue(), b"", b"hello, not an image", b"\x08\x00" + b"\xff" * 200):
        assert not is_dicom(data)


def test_no_phi_in_info_or_errors():
    data = _dicom(np.zeros((8, 8), np.uint8), PixelSpacing=[0.5, 0.5])
    decoded, info = decode_dicom(data)
    text = repr(info) + repr(decoded)
    for phi in (PATIENT, "Doe", PATIENT_ID, BIRTH_DATE, "20240102"):
        assert phi not in text
    with pytest.raises(ImageDecodeError) as err:
        decode_dicom(_dicom(None))
    for phi in (PATIENT, PATIENT_ID, BIRTH_DATE):
        assert phi not in str(err.value)


def test_implicit_vr_file_decodes():
    ds = _dataset(np.tile(STORED_ROW, (8, 1)), WindowCenter=300, WindowWidth=401, RescaleSlope=2, RescaleIntercept=-100)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    decoded, info = decode_dicom(_bytes(ds))
    np.testing.assert_array_equal(decoded.pixels[0], WINDOWED_ROW)
    assert info.transfer_syntax == "Implicit VR Little Endian"
