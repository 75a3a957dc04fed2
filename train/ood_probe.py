"""The out-of-distribution probe set: images that are not brain MRI slices, built on the spot (no downloads) for the
model card, the evaluation and the tests: noise, blanks, gradients, checkerboards, scikit-image's bundled photos and
its Shepp-Logan head phantom (the nearest to a head slice).

Torch-free. Every probe is a greyscale uint8 array, as the decoder would hand it to preprocessing.
"""

from __future__ import annotations

import numpy as np

SIZE = 256
# scikit-image's bundled photos (in the wheel, never fetched): loader name in ``skimage.data``.
PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "moon", "page", "text", "horse",
          "hubble_deep_field", "brick", "grass", "gravel", "retina", "clock", "cell", "immunohistochemistry",
          "microaneurysms", "logo", "colorwheel")


KINDS = ("noise", "blank", "gradient", "checkerboard", "photo", "phantom")


def _synthetic(size: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / (size - 1)
    radius = np.hypot(yy - 0.5, xx - 0.5) / np.sqrt(0.5)

    def grey(a: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(a), 0, 255).astype(np.uint8)

    def checker(cell: int) -> np.ndarray:
        idx = np.arange(size) // cell
        return grey(((idx[:, None] + idx[None]) % 2) * 255)

    return {
        "uniform_noise": rng.integers(0, 256, (size, size), dtype=np.uint8),
        "uniform_noise_2": rng.integers(0, 256, (size, size), dtype=np.uint8),
        "gaussian_noise": grey(rng.normal(128, 40, (size, size))),
        "gaussian_noise_dark": grey(rng.normal(60, 30, (size, size))),
        "salt_and_pepper": grey((rng.random((size, size)) < 0.5) * 255),
        "blank_black": np.zeros((size, size), np.uint8),
        "blank_white": np.full((size, size), 255, np.uint8),
        "blank_grey": np.full((size, size), 128, np.uint8),
        "gradient_horizontal": grey(xx * 255),
        "gradient_vertical": grey(yy * 255),
        "gradient_radial": grey((1 - radius) * 255),
        "gradient_radial_inverted": grey(radius * 255),
        "checkerboard_8": checker(8),
        "checkerboard_32": checker(32),
    }


def _photo(name: str) -> np.ndarray:
    from skimage import data
    from skimage.color import rgb2gray, rgba2rgb

    image = np.asarray(getattr(data, name)())
    if image.ndim == 3 and image.shape[2] == 4:
        image = rgba2rgb(image)
    if image.ndim == 3:
        image = rgb2gray(image) * 255  # float in [0, 1]
    elif image.dtype != np.uint8:
        image = image.astype(np.float64) / max(float(image.max()), 1.0) * 255
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def probe_images(size: int = SIZE, seed: int = 0, photos: bool = True) -> dict[str, np.ndarray]:
    """``{name: (H, W) uint8}``: the synthetic probes at ``size`` and, with ``photos``, scikit-image's bundled photos
    converted to grey (needs scikit-image, the ``dev`` extra)."""
    probes = _synthetic(size, seed)
    if photos:
        probes.update({f"photo_{name}": _photo(name) for name in PHOTOS})
        probes["phantom_shepp_logan"] = _photo("shepp_logan_phantom")
    return probes


def probe_kind(name: str) -> str:
    """The family of a probe: noise, blank, gradient, checkerboard, photo or phantom."""
    for kind in KINDS:
        if kind in name or (kind == "noise" and name == "salt_and_pepper"):
            return kind
    raise ValueError(f"unknown probe {name!r}")
