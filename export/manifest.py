"""manifest.json of a model version: sha256 and size of every artifact, and its verification.

Stdlib only. The Triton python backend (python_backend/model.py) cannot import this package inside Triton's stub, so
it carries its own ~15-line verifier of the same format; tests run both on the same corrupted files.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..train.hashing import file_sha256
from .contract import MANIFEST_FILE

FORMAT = 1
# Written by Python/Triton at load time, never an artifact.
_IGNORED_DIRS = {"__pycache__"}


class ManifestError(ValueError):
    """A version folder does not match its manifest (missing, corrupted or unlisted file)."""


def _artifacts(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and p.name != MANIFEST_FILE and not _IGNORED_DIRS & set(p.relative_to(folder).parts)
    )


def write_manifest(folder: str | Path, extra: dict | None = None) -> Path:
    """Hash every file under ``folder`` (except the manifest itself) into ``folder/manifest.json``."""
    folder = Path(folder)
    files = {
        p.relative_to(folder).as_posix(): {"sha256": file_sha256(p), "bytes": p.stat().st_size}
        for p in _artifacts(folder)
    }
    if not files:
        raise ManifestError(f"{folder}: no artifacts to list in a manifest")
    path = folder / MANIFEST_FILE
    path.write_text(json.dumps({"format": FORMAT, "algorithm": "sha256", "files": files, **(extra or {})}, indent=2)
                    + "\n")
    return path


def verify_manifest(folder: str | Path) -> dict:
    """Check every listed file's size and sha256; returns the manifest. Raises ManifestError naming the bad file."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{path}: manifest missing; re-export the model with `braintumor export`") from None
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: manifest is not valid JSON ({exc}); re-export the model") from None
    if manifest.get("format") != FORMAT or manifest.get("algorithm") != "sha256" or not manifest.get("files"):
        raise ManifestError(f"{path}: unknown manifest format; expected format {FORMAT} with sha256 file hashes")
    for rel, entry in manifest["files"].items():
        target = folder / rel
        if not target.is_file():
            raise ManifestError(f"{target}: listed in {MANIFEST_FILE} but missing; re-export or restore it")
        if target.stat().st_size != entry["bytes"]:
            raise ManifestError(f"{target}: size {target.stat().st_size} != {entry['bytes']} bytes in {MANIFEST_FILE}; "
                                "the file is truncated or replaced")
        if file_sha256(target) != entry["sha256"]:
            raise ManifestError(f"{target}: sha256 does not match {MANIFEST_FILE}; the file is corrupted or was "
                                "modified after export")
    unlisted = sorted(set(p.relative_to(folder).as_posix() for p in _artifacts(folder)) - set(manifest["files"]))
    if unlisted:
        raise ManifestError(f"{folder}: files not in {MANIFEST_FILE}: {', '.join(unlisted)}; remove them or re-export")
    return manifest
