"""Tiny deterministic synthetic slices in the BRISC 2025 layout, for unit tests only (never real data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .naming import CLASS_CODES, CLASSES, NO_TUMOR, PLANE_CODES

_PLANES = tuple(PLANE_CODES)
# A blob's place and size differ by class, so tiny models can learn something in a few steps.
_BLOB = {"glioma": (0.35, 0.35, 0.16), "meningioma": (0.3, 0.7, 0.1), "pituitary": (0.68, 0.5, 0.08)}


def synthetic_slice(label: str, size: tuple[int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """One greyscale "head" ellipse with an optional bright tumour blob and its soft-edged mask (0..255)."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    head = ((yy - h / 2) / (0.42 * h)) ** 2 + ((xx - w / 2) / (0.38 * w)) ** 2 <= 1.0
    img = np.where(head, 70 + rng.normal(0, 12, (h, w)), rng.normal(3, 2, (h, w)))
    mask = None
    if label != NO_TUMOR:
        cy, cx, r = _BLOB[label]
        cy, cx = (cy + rng.uniform(-0.04, 0.04)) * h, (cx + rng.uniform(-0.04, 0.04)) * w
        dist = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) / (r * min(h, w))
        img = np.where(dist <= 1.0, 200 + rng.normal(0, 10, (h, w)), img)
        # Soft edge like the real masks: a ramp from 255 inside to 0 just outside.
        mask = np.clip((1.15 - dist) / 0.3, 0, 1) * 255
        mask = mask.astype(np.uint8)
    return np.clip(img, 0, 255).astype(np.uint8), mask


def make_synthetic_dataset(
    root: str | Path,
    n_per_class: int = 4,
    size: tuple[int, int] = (72, 64),
    split: str = "train",
    seed: int = 0,
    rgb_no_tumor: bool = True,
) -> Path:
    """Write ``n_per_class`` slices per class as ``root/{classification,segmentation}_task/<split>/…``.

    Like the real data, no_tumor images are saved as RGB with equal channels and have no mask.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    seg_img, seg_mask = root / "segmentation_task" / split / "images", root / "segmentation_task" / split / "masks"
    seg_img.mkdir(parents=True, exist_ok=True)
    seg_mask.mkdir(parents=True, exist_ok=True)
    index = 1
    for label in CLASSES:
        class_dir = root / "classification_task" / split / label
        class_dir.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            img, mask = synthetic_slice(label, size, rng)
            stem = f"brisc2025_{split}_{index:05d}_{CLASS_CODES[label]}_{_PLANES[i % 3]}_t1"
            index += 1
            pil = Image.fromarray(img)
            if label == NO_TUMOR and rgb_no_tumor:
                pil = pil.convert("RGB")
            pil.save(class_dir / f"{stem}.jpg", quality=95)
            if mask is not None:
                pil.save(seg_img / f"{stem}.jpg", quality=95)
                Image.fromarray(mask).save(seg_mask / f"{stem}.png")
    return root


def synthetic_dicom(pixels: np.ndarray | None, bits_stored: int | None = None, photometric: str = "MONOCHROME2",
                    **tags) -> bytes:
    """An MR DICOM file (explicit VR little endian) holding ``pixels`` (none: no PixelData) and the header ``tags``,
    set after the pixels (e.g. ``PatientName``, ``RescaleSlope``, ``PixelSpacing``)."""
    import io

    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = MRImageStorage, meta.MediaStorageSOPInstanceUID, "MR"
    if pixels is not None:
        ds.set_pixel_data(pixels, photometric, bits_stored or pixels.dtype.itemsize * 8)
    for key, value in tags.items():
        setattr(ds, key, value)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
