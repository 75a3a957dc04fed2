"""Checkpoint format: model weights and rebuild config, optimiser/scheduler/RNG state, resolved run config, preprocessing."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from ..factory import build_model
from ..naming import CLASSES

FORMAT = 1


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
        state["cuda_device"] = torch.cuda.current_device()  # the generator this process advanced
    return state


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    """Restore a saved RNG state. With a CUDA ``device`` (a torchrun rank), only that device's generator is set,
    from the generator the saving process used: every rank runs the same random stream (same seed, same draws),
    so rank 0's saved state is every rank's state, but rank r's stream lives on cuda:r."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        if device is not None and device.type == "cuda" and "cuda_device" in state:
            torch.cuda.set_rng_state(state["cuda"][state["cuda_device"]], device)
        else:
            torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, *, model, run_config: dict, epoch: int, optimizer=None, scheduler=None,
                    best_score: float | None = None, extra: dict | None = None) -> None:
    """Write atomically (temp file + rename) so an interrupted save never leaves a broken last.pt."""
    state = {
        "format": FORMAT,
        "classes": list(CLASSES),
        "model_config": model.config,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "preprocess": model.config["preprocess"],
        "run_config": run_config,
        "epoch": epoch,
        "best_score": best_score,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": rng_state(),
        "temperature": 1.0,
        **(extra or {}),
    }
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found; train one with `braintumor train --out RUN` (RUN/best.pt)")
    state = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path}: not a braintumor checkpoint (format {FORMAT} expected)")
    return state


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild the model from a checkpoint (no pretrained download) and return it in eval mode with the state dict."""
    state = load_checkpoint(path)
    config = dict(state["model_config"], pretrained=False)
    model = build_model(**config)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state
