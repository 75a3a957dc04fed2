"""Decode-once cache: every slice preprocessed to uint8 arrays (images, masks) plus an index, so training never decodes JPEGs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .decode import ImageDecodeError, decode_image, decode_mask
from .preprocess import Geometry, PreprocessConfig, preprocess, preprocess_mask
from .progress import progress_bar
from .samples import Sample, read_samples_csv, write_samples_csv

CACHE_FORMAT = 1


@dataclass
class SliceCache:
    """Arrays are memory-mapped: N x S x S uint8 images and binary masks, rows aligned with ``samples``."""

    path: Path
    images: np.ndarray
    masks: np.ndarray
    samples: list[Sample]
    preprocess: PreprocessConfig
    skipped: list[dict]

    @property
    def labels(self) -> list[str]:
        return [s.label for s in self.samples]


def _load_one(args: tuple[Sample, dict]) -> tuple[np.ndarray, np.ndarray, Geometry] | str:
    sample, cfg_dict = args
    cfg = PreprocessConfig.from_dict(cfg_dict)
    try:
        pixels = decode_image(sample.image_path).pixels
        image, geom = preprocess(pixels, cfg)
        mask = np.zeros_like(image)
        if sample.mask_path is not None:
            full = decode_mask(sample.mask_path, cfg.mask_threshold)
            if full.shape != pixels.shape:
                return f"{sample.mask_path}: mask is {full.shape[1]}x{full.shape[0]} but its image is {pixels.shape[1]}x{pixels.shape[0]}"
            mask = preprocess_mask(full, geom)
    except ImageDecodeError as exc:
        return str(exc)
    return image, mask, geom


def fingerprint(samples: list[Sample], cfg: PreprocessConfig) -> str:
    h = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode())
    for s in samples:
        h.update(f"{s.key}|{s.label}|{s.image_path}|{s.mask_path}\n".encode())
    return h.hexdigest()[:16]


def default_cache_root() -> Path:
    return Path(os.environ.get("BRAINTUMOR_CACHE", Path.home() / ".cache" / "braintumor"))


def decode_samples(
    samples: list[Sample], cfg: PreprocessConfig, *, skip_bad: bool = False, workers: int | None = None,
    progress: bool = True, desc: str = "decoding", geometries: bool = False,
) -> tuple:
    """Decode and preprocess ``samples`` in parallel; returns images, masks, kept samples and skipped problems, and with
    ``geometries`` each kept slice's Geometry too (to map predictions back to the original without decoding again)."""
    workers = workers or min(4, os.cpu_count() or 1)
    jobs = [(s, cfg.to_dict()) for s in samples]
    size = cfg.image_size
    images = np.zeros((len(samples), size, size), np.uint8)
    masks = np.zeros((len(samples), size, size), np.uint8)
    kept: list[Sample] = []
    skipped: list[dict] = []
    geoms: list[Geometry] = []
    with ProcessPoolExecutor(workers) as pool:
        results = pool.map(_load_one, jobs, chunksize=32) if workers > 1 and len(jobs) > 64 else map(_load_one, jobs)
        for sample, result in progress_bar(zip(samples, results), total=len(jobs), desc=desc, unit="img", disable=not progress):
            if isinstance(result, str):
                if not skip_bad:
                    raise ImageDecodeError(f"{result}\n  fix or remove the file, or pass --skip-bad to skip and count it")
                skipped.append({"path": sample.image_path, "reason": result})
                continue
            images[len(kept)], masks[len(kept)], geom = result
            geoms.append(geom)
            kept.append(sample)
    decoded = images[: len(kept)], masks[: len(kept)], kept, skipped
    return (*decoded, geoms) if geometries else decoded


def prepare_cache(
    samples: list[Sample], cfg: PreprocessConfig, out_dir: str | Path | None = None, *,
    skip_bad: bool = False, workers: int | None = None, progress: bool = True,
) -> SliceCache:
    """Build (or reuse, when its fingerprint matches) the cache for ``samples`` under ``out_dir``."""
    out = Path(out_dir) if out_dir else default_cache_root() / f"cache-{fingerprint(samples, cfg)}"
    meta_path = out / "cache.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("fingerprint") == fingerprint(samples, cfg) and meta.get("format") == CACHE_FORMAT:
            return load_cache(out)
        shutil.rmtree(out)
    images, masks, kept, skipped = decode_samples(samples, cfg, skip_bad=skip_bad, workers=workers, progress=progress)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.save(tmp / "images.npy", images)
    np.save(tmp / "masks.npy", masks)
    write_samples_csv(kept, tmp / "index.csv")
    meta = {"format": CACHE_FORMAT, "fingerprint": fingerprint(samples, cfg), "preprocess": cfg.to_dict(),
            "count": len(kept), "skipped": skipped}
    (tmp / "cache.json").write_text(json.dumps(meta, indent=2))
    os.replace(tmp, out)  # a half-written cache is never mistaken for a finished one
    return load_cache(out)


def load_cache(path: str | Path) -> SliceCache:
    path = Path(path)
    meta_file = path / "cache.json"
    if not meta_file.exists():
        raise FileNotFoundError(f"{path}: not a braintumor cache (no cache.json); build one with `braintumor prepare-data`")
    meta = json.loads(meta_file.read_text())
    rows = read_samples_csv(path / "index.csv")
    samples = [Sample(r["key"], r["split"], r["label"], r["plane"], r["image_path"], r["mask_path"] or None) for r in rows]
    return SliceCache(
        path, np.load(path / "images.npy", mmap_mode="r"), np.load(path / "masks.npy", mmap_mode="r"),
        samples, PreprocessConfig.from_dict(meta["preprocess"]), meta.get("skipped", []),
    )


def is_cache(path: str | Path) -> bool:
    return (Path(path) / "cache.json").exists()
