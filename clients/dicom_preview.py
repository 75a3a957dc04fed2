"""A preview PNG of stored results, rendered from the DICOM objects themselves (not from the service's JSON): the
source slice with the SEG's tumour outline, beside the Grad-CAM Secondary Capture. The README's "Hospital integration"
picture is made by this from the objects Orthanc stored:

    python -m braintumor.clients.dicom_preview SOURCE.dcm SEG.dcm OVERLAY.dcm OUT.png [COLOURS]
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np


def _display(source) -> np.ndarray:
    """The source frame the SEG marks, as 8-bit grey the way a viewer shows it (VOI window or min-max; MONOCHROME1
    inverted)."""
    from pydicom.pixels import apply_voi_lut

    frames = int(source.get("NumberOfFrames", 1) or 1)
    pixels = source.pixel_array[frames // 2] if frames > 1 else source.pixel_array
    values = apply_voi_lut(pixels, source).astype(np.float64)
    lo, hi = float(values.min()), float(values.max())
    grey = np.zeros_like(values) if hi <= lo else (values - lo) * (255.0 / (hi - lo))
    if source.get("PhotometricInterpretation") == "MONOCHROME1":
        grey = 255.0 - grey
    return np.rint(grey).astype(np.uint8)


def seg_mask(seg, source) -> np.ndarray:
    """The SEG's tumour segment on the source's analysed frame (our SEGs: one frame per source frame)."""
    frames = np.asarray(seg.pixel_array)
    if frames.ndim == 2:
        return frames > 0
    return frames[frames.shape[0] // 2] > 0


def render(source, seg, overlay, height: int = 256, colours: int | None = None) -> bytes:
    """PNG bytes: [source + SEG outline in red | overlay], each scaled to ``height`` pixels; ``colours``: a palette of
    at most that many colours (a smaller file, for documentation)."""
    import cv2
    from PIL import Image

    grey = _display(source)
    mask = seg_mask(seg, source).astype(np.uint8)
    left = np.stack([grey] * 3, axis=-1)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(left, contours, -1, (255, 0, 0), max(1, grey.shape[0] // 128))
    panels = [left, np.asarray(overlay.pixel_array, dtype=np.uint8)]
    scaled = [Image.fromarray(p).resize((round(p.shape[1] * height / p.shape[0]), height), Image.BILINEAR)
              for p in panels]
    canvas = Image.new("RGB", (sum(s.width for s in scaled) + 4 * (len(scaled) - 1), height), (255, 255, 255))
    x = 0
    for panel in scaled:
        canvas.paste(panel, (x, 0))
        x += panel.width + 4
    if colours:
        canvas = canvas.quantize(colors=colours, method=Image.Quantize.MEDIANCUT)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    import pydicom

    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (4, 5):
        print("usage: python -m braintumor.clients.dicom_preview SOURCE.dcm SEG.dcm OVERLAY.dcm OUT.png [COLOURS]",
              file=sys.stderr)
        return 2
    source, seg, overlay = (pydicom.dcmread(p) for p in args[:3])
    Path(args[3]).write_bytes(render(source, seg, overlay, colours=int(args[4]) if len(args) == 5 else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
