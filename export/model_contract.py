"""The deployment contract of one model, typed: what a server must know to serve it (class order, preprocessing,
calibration, the refer rules' fitted parameters, the CAM grid). Torch-free.

One record, four forms, each written and read here only:

    checkpoint (train/: trainer/checkpoint.py, calibrate.py, ood.py write its fields) --from_checkpoint-->
    ModelContract --to_metadata / from_metadata--> metadata.json (export/repository.py)
                  --to_parameters / from_parameters--> config.pbtxt parameters (export/triton_config.py), which
                    serving reads back through Triton's model-config API or the file (serving/backend.ModelInfo)

A new field is one attribute and its line in each of the four methods; tests/unit/test_model_contract.py round-trips
every form.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..train.preprocess import PreprocessConfig
from ..train.refer import ReferRules
from .contract import (
    PARAM_CAM_SIZE,
    PARAM_CLASSES,
    PARAM_DISAGREE_MIN_AREA,
    PARAM_OOD_THRESHOLD,
    PARAM_PREPROCESS,
    PARAM_REFER_THRESHOLD,
    PARAM_TEMPERATURE,
)


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True)
class ModelContract:
    classes: tuple[str, ...]
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    temperature: float = 1.0  # folded into the exported graph; reported, not applied again
    refer_threshold: float | None = None  # top calibrated probability under it is referred (train/calibrate.py)
    disagree_min_area: float | None = None  # model-input pixels (train/refer.py); None: fitted before the rule
    ood_threshold: float | None = None  # learned OOD score above it is referred (train/ood.py); None: no score
    cam_size: int = 0  # side of the graph's CAM grid

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(self.classes))
        if not self.classes:
            raise ValueError("a model contract needs its class names, in output order")
        if not isinstance(self.preprocess, PreprocessConfig):
            object.__setattr__(self, "preprocess", PreprocessConfig.from_dict(dict(self.preprocess)))
        object.__setattr__(self, "temperature", float(self.temperature))
        for name in ("refer_threshold", "disagree_min_area", "ood_threshold"):
            object.__setattr__(self, name, _optional_float(getattr(self, name)))
        object.__setattr__(self, "cam_size", int(self.cam_size))

    @property
    def image_size(self) -> int:
        return self.preprocess.image_size

    @property
    def refer_rules(self) -> ReferRules:
        return ReferRules(self.refer_threshold, self.disagree_min_area, self.ood_threshold)

    # -- the checkpoint ---------------------------------------------------------------------------------------

    @classmethod
    def from_checkpoint(cls, state: Mapping[str, Any], cam_size: int = 0) -> ModelContract:
        """From a checkpoint's state dict (``classes``, ``preprocess``, and what calibration and the OOD fit added);
        ``cam_size``: the graph's CAM grid (export/wrappers.cam_size), not stored in a checkpoint."""
        ood = state.get("ood")
        return cls(classes=tuple(state.get("classes") or ()), preprocess=PreprocessConfig.from_dict(state["preprocess"]),
                   temperature=state.get("temperature") or 1.0, refer_threshold=state.get("refer_threshold"),
                   disagree_min_area=state.get("disagree_min_area"),
                   ood_threshold=float(ood["threshold"]) if ood else None, cam_size=cam_size)

    # -- metadata.json ----------------------------------------------------------------------------------------

    def to_metadata(self) -> dict[str, Any]:
        """The contract's keys of metadata.json (the export adds tensors, parity and provenance beside them)."""
        return {"classes": list(self.classes), "preprocess": self.preprocess.to_dict(),
                "temperature": self.temperature, "refer_threshold": self.refer_threshold,
                "disagree_min_area": self.disagree_min_area, "ood_threshold": self.ood_threshold,
                "image_size": self.image_size, "cam_size": self.cam_size}

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> ModelContract:
        return cls(classes=tuple(meta["classes"]), preprocess=PreprocessConfig.from_dict(meta["preprocess"]),
                   temperature=meta.get("temperature") or 1.0, refer_threshold=meta.get("refer_threshold"),
                   disagree_min_area=meta.get("disagree_min_area"), ood_threshold=meta.get("ood_threshold"),
                   cam_size=meta.get("cam_size") or 0)

    # -- config.pbtxt parameters (string values holding JSON) ---------------------------------------------------

    def to_parameters(self) -> dict[str, str]:
        """The contract as config parameters, readable over Triton's model-config API; an unset rule is left out."""
        params = {
            PARAM_CLASSES: json.dumps(list(self.classes)),
            PARAM_PREPROCESS: json.dumps(self.preprocess.to_dict(), sort_keys=True),
            PARAM_TEMPERATURE: json.dumps(self.temperature),
            PARAM_CAM_SIZE: json.dumps(self.cam_size),
        }
        for key, value in ((PARAM_REFER_THRESHOLD, self.refer_threshold),
                           (PARAM_DISAGREE_MIN_AREA, self.disagree_min_area),
                           (PARAM_OOD_THRESHOLD, self.ood_threshold)):
            if value is not None:
                params[key] = json.dumps(value)
        return params

    @classmethod
    def from_parameters(cls, params: Mapping[str, str]) -> ModelContract:
        """From config parameters (key -> JSON string); KeyError naming a missing key, ValueError for bad JSON."""
        def value(key: str, default: Any = None) -> Any:
            text = params.get(key)
            return json.loads(text) if text else default

        missing = [k for k in (PARAM_CLASSES, PARAM_PREPROCESS) if not params.get(k)]
        if missing:
            raise KeyError(f"no {missing} parameters")
        return cls(classes=tuple(value(PARAM_CLASSES)), preprocess=PreprocessConfig.from_dict(value(PARAM_PREPROCESS)),
                   temperature=value(PARAM_TEMPERATURE, 1.0), refer_threshold=value(PARAM_REFER_THRESHOLD),
                   disagree_min_area=value(PARAM_DISAGREE_MIN_AREA), ood_threshold=value(PARAM_OOD_THRESHOLD),
                   cam_size=value(PARAM_CAM_SIZE, 0))
