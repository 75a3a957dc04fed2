from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AnalyzeRequest(_message.Message):
    __slots__ = ("image", "overlay", "id", "skip_images", "heatmap", "mask_format", "dicom")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    OVERLAY_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    SKIP_IMAGES_FIELD_NUMBER: _ClassVar[int]
    HEATMAP_FIELD_NUMBER: _ClassVar[int]
    MASK_FORMAT_FIELD_NUMBER: _ClassVar[int]
    DICOM_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    overlay: bool
    id: str
    skip_images: bool
    heatmap: bool
    mask_format: str
    dicom: bool
    def __init__(self, image: _Optional[bytes] = ..., overlay: _Optional[bool] = ..., id: _Optional[str] = ..., skip_images: _Optional[bool] = ..., heatmap: _Optional[bool] = ..., mask_format: _Optional[str] = ..., dicom: _Optional[bool] = ...) -> None: ...

class AnalyzeResponse(_message.Message):
    __slots__ = ("id", "label", "probabilities", "refer", "refer_reason", "tumor_area_px", "tumor_area_mm2", "mask_label_disagree", "image_height", "image_width", "mask_png", "heatmap_png", "overlay_png", "model", "error", "mask_rle", "dicom")
    class ProbabilitiesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    REFER_FIELD_NUMBER: _ClassVar[int]
    REFER_REASON_FIELD_NUMBER: _ClassVar[int]
    TUMOR_AREA_PX_FIELD_NUMBER: _ClassVar[int]
    TUMOR_AREA_MM2_FIELD_NUMBER: _ClassVar[int]
    MASK_LABEL_DISAGREE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_WIDTH_FIELD_NUMBER: _ClassVar[int]
    MASK_PNG_FIELD_NUMBER: _ClassVar[int]
    HEATMAP_PNG_FIELD_NUMBER: _ClassVar[int]
    OVERLAY_PNG_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    MASK_RLE_FIELD_NUMBER: _ClassVar[int]
    DICOM_FIELD_NUMBER: _ClassVar[int]
    id: str
    label: str
    probabilities: _containers.ScalarMap[str, float]
    refer: bool
    refer_reason: _containers.RepeatedScalarFieldContainer[str]
    tumor_area_px: int
    tumor_area_mm2: float
    mask_label_disagree: bool
    image_height: int
    image_width: int
    mask_png: bytes
    heatmap_png: bytes
    overlay_png: bytes
    model: ModelRef
    error: Error
    mask_rle: MaskRle
    dicom: DicomResults
    def __init__(self, id: _Optional[str] = ..., label: _Optional[str] = ..., probabilities: _Optional[_Mapping[str, float]] = ..., refer: _Optional[bool] = ..., refer_reason: _Optional[_Iterable[str]] = ..., tumor_area_px: _Optional[int] = ..., tumor_area_mm2: _Optional[float] = ..., mask_label_disagree: _Optional[bool] = ..., image_height: _Optional[int] = ..., image_width: _Optional[int] = ..., mask_png: _Optional[bytes] = ..., heatmap_png: _Optional[bytes] = ..., overlay_png: _Optional[bytes] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., mask_rle: _Optional[_Union[MaskRle, _Mapping]] = ..., dicom: _Optional[_Union[DicomResults, _Mapping]] = ...) -> None: ...

class DicomResults(_message.Message):
    __slots__ = ("seg", "sr", "overlay")
    SEG_FIELD_NUMBER: _ClassVar[int]
    SR_FIELD_NUMBER: _ClassVar[int]
    OVERLAY_FIELD_NUMBER: _ClassVar[int]
    seg: bytes
    sr: bytes
    overlay: bytes
    def __init__(self, seg: _Optional[bytes] = ..., sr: _Optional[bytes] = ..., overlay: _Optional[bytes] = ...) -> None: ...

class MaskRle(_message.Message):
    __slots__ = ("size", "counts")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    size: _containers.RepeatedScalarFieldContainer[int]
    counts: str
    def __init__(self, size: _Optional[_Iterable[int]] = ..., counts: _Optional[str] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("image", "method", "target", "num_samples", "max_evals")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    MAX_EVALS_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    method: str
    target: str
    num_samples: int
    max_evals: int
    def __init__(self, image: _Optional[bytes] = ..., method: _Optional[str] = ..., target: _Optional[str] = ..., num_samples: _Optional[int] = ..., max_evals: _Optional[int] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("method", "target", "label", "probabilities", "num_samples", "seconds", "cached", "image_height", "image_width", "heatmap_png", "overlay_png", "model")
    class ProbabilitiesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    METHOD_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    IMAGE_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEATMAP_PNG_FIELD_NUMBER: _ClassVar[int]
    OVERLAY_PNG_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    method: str
    target: str
    label: str
    probabilities: _containers.ScalarMap[str, float]
    num_samples: int
    seconds: float
    cached: bool
    image_height: int
    image_width: int
    heatmap_png: bytes
    overlay_png: bytes
    model: ModelRef
    def __init__(self, method: _Optional[str] = ..., target: _Optional[str] = ..., label: _Optional[str] = ..., probabilities: _Optional[_Mapping[str, float]] = ..., num_samples: _Optional[int] = ..., seconds: _Optional[float] = ..., cached: _Optional[bool] = ..., image_height: _Optional[int] = ..., image_width: _Optional[int] = ..., heatmap_png: _Optional[bytes] = ..., overlay_png: _Optional[bytes] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ...) -> None: ...

class ModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "classes", "refer_threshold", "image_size", "geometry", "disagree_min_area", "ood_threshold")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    REFER_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    GEOMETRY_FIELD_NUMBER: _ClassVar[int]
    DISAGREE_MIN_AREA_FIELD_NUMBER: _ClassVar[int]
    OOD_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    classes: _containers.RepeatedScalarFieldContainer[str]
    refer_threshold: float
    image_size: int
    geometry: str
    disagree_min_area: float
    ood_threshold: float
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., classes: _Optional[_Iterable[str]] = ..., refer_threshold: _Optional[float] = ..., image_size: _Optional[int] = ..., geometry: _Optional[str] = ..., disagree_min_area: _Optional[float] = ..., ood_threshold: _Optional[float] = ...) -> None: ...

class ModelRef(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...
