"""FP16 weight storage for exported ONNX graphs: weights kept as float16 on disk, computed in float32.

Each large float32 initializer becomes a float16 initializer plus a ``Cast(to=FLOAT)`` that produces the original
name, so every consumer still sees float32. ONNX Runtime constant-folds these casts when the session loads: the
running graph is the fp32 graph with fp16-rounded weights, at fp32 speed, from a file about half the size. The
parity check then needs the looser tolerances below (the rounding, not the runtime, sets the error).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .contract import CAM, CLASS_PROBS, MASK_PROB, OOD_SCORE

MIN_ELEMENTS = 1024  # smaller tensors (biases, scalars, shapes) are not worth a Cast node
FP16_MAX = float(np.finfo(np.float16).max)
FP16_SUFFIX = "__fp16"

# ONNX Runtime on fp16-stored weights vs PyTorch fp32, per output: (atol, rtol). fp16 keeps 11 significant bits
# (<= 4.9e-4 relative rounding per weight) and the output error grows as the model gets more confident. Measured on
# 8 real BRISC slices, resnet18 U-Net at 128 px, release-run checkpoints (max abs error; random init is 20x lower):
#   epoch 1 (val acc 0.70): class_probs 9.1e-5, mask_prob 1.9e-4, cam 2.6e-3 (maps up to 5.4)
#   epoch 2 (val acc 0.79): class_probs 2.2e-4, mask_prob 8.5e-4, cam 5.5e-3 (maps up to 7.6; ~7e-4 of the scale)
# The tolerances keep 12-23x margin on epoch 2 for later, sharper checkpoints; they only have to bound rounding,
# because the export first proves the fp32-weight graph at PARITY_ATOL/RTOL (1e-4, 1e-3; measured < 2e-6), and
# still catch a structural error (~0.1-1). cam is unbounded and its error near a zero crossing scales with the
# whole map, not the element, hence its larger atol.
FP16_PARITY_TOLERANCES: dict[str, tuple[float, float]] = {
    CLASS_PROBS: (5e-3, 1e-2),
    MASK_PROB: (1e-2, 1e-2),
    CAM: (1e-1, 2e-2),
    # A squared distance in the hundreds to thousands: the rounded weights move the pooled features and the score
    # follows relatively. Measured max rel error: 6.8e-4 on the release model (8 real slices), 2.2e-3 on the test model.
    OOD_SCORE: (1e-1, 2e-2),
}


def store_weights_fp16(path_in: str | Path, path_out: str | Path | None = None,
                       min_elements: int = MIN_ELEMENTS) -> dict:
    """Rewrite the ONNX file ``path_in`` (in place when ``path_out`` is None) with every float32 initializer of at
    least ``min_elements`` elements stored as float16 behind a ``Cast(to=FLOAT)``; runs onnx.checker on the result.

    Initializers that are also graph inputs (overridable at run time) and those with values beyond the fp16 range
    stay float32. ``Constant`` nodes are not initializers and stay as exported: the OOD score's class means and
    whitening (non-persistent buffers, which the exporter writes as Constant nodes) keep float32. Returns counts and sizes: ``converted``, ``kept_fp32``, ``skipped_out_of_range``,
    ``bytes_before``, ``bytes_after`` (file sizes) and ``weight_bytes_before``/``weight_bytes_after``.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    path_in = Path(path_in)
    path_out = Path(path_out) if path_out is not None else path_in
    bytes_before = path_in.stat().st_size
    model = onnx.load(str(path_in))
    graph = model.graph
    graph_inputs = {i.name for i in graph.input}
    taken = {i.name for i in graph.initializer} | graph_inputs | {o for n in graph.node for o in n.output}

    casts, kept, out_of_range = [], [], []
    weight_before = weight_after = 0
    for init in graph.initializer:
        if init.data_type != TensorProto.FLOAT:
            continue
        array = numpy_helper.to_array(init)
        weight_before += array.nbytes
        if array.size < min_elements or init.name in graph_inputs:
            kept.append(init.name)
            weight_after += array.nbytes
            continue
        if not np.isfinite(array).all() or np.abs(array).max() > FP16_MAX:
            out_of_range.append(init.name)
            weight_after += array.nbytes
            continue
        name = init.name
        stored = _unique(f"{name}{FP16_SUFFIX}", taken)
        init.CopyFrom(numpy_helper.from_array(array.astype(np.float16), stored))
        weight_after += array.size * 2
        casts.append(helper.make_node("Cast", [stored], [name], to=TensorProto.FLOAT, name=f"{stored}_cast"))
    # Casts go first so the node list stays topologically sorted.
    nodes = [*casts, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)

    onnx.checker.check_model(model, full_check=True)
    path_out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path_out))  # one self-contained file: a copied repository cannot lose a .data file
    return {"converted": len(casts), "kept_fp32": len(kept), "skipped_out_of_range": len(out_of_range),
            "bytes_before": bytes_before, "bytes_after": path_out.stat().st_size,
            "weight_bytes_before": weight_before, "weight_bytes_after": weight_after}


def _unique(name: str, taken: set[str]) -> str:
    candidate, i = name, 1
    while candidate in taken:
        candidate, i = f"{name}_{i}", i + 1
    taken.add(candidate)
    return candidate
