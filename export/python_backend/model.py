"""Triton python-backend model: runs the exported ONNX graph with ONNX Runtime inside Triton.

`braintumor export` copies this file into every version folder. It runs in Triton's python stub, so it imports
neither torch nor braintumor: numpy, onnxruntime and the standard library only. The model loads once in
``initialize`` (after its manifest verifies), and each ``execute`` runs all requests of a dynamic batch together.
"""

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

ONNX_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
# ONNX Runtime's CPU arena keeps the memory of the largest batch it ever ran, for good: a flood of batch-32 requests
# took one stub from 145 to 840 MB, where it stayed. ArenaShrink gives it back once the flood is over. The same class
# is in serving/local_model.py (tests/unit/test_memory_bounds.py checks the two are equal).
ARENA_KEEP_BATCH = 8
SHRINK_AFTER_S = 1.0
SHRINK_ARENA = ("memory.enable_memory_arena_shrinkage", "cpu:0")


class ArenaShrink:
    """When ONNX Runtime's CPU arena gives memory back. It keeps the memory of the largest batch it ran, for good; a
    shrink after every large batch cost ~4 ms of CPU per image at batch 32 (measured), so none happens while large
    batches keep coming. The first batch of at most ARENA_KEEP_BATCH images once none larger has run for
    SHRINK_AFTER_S runs with ``options`` (RunOptions with SHRINK_ARENA): after a flood, the next ordinary request
    gives the flood's memory back."""

    def __init__(self, options):
        self.options = options
        self.grown_at = None  # when the last batch larger than ARENA_KEEP_BATCH ran; None: nothing to give back

    def run_options(self, batch, now):
        if batch > ARENA_KEEP_BATCH:
            self.grown_at = now
            return None
        if self.grown_at is not None and now - self.grown_at >= SHRINK_AFTER_S:
            self.grown_at = None
            return self.options
        return None


def verify_manifest(folder):
    """Same format and checks as braintumor.export.manifest.verify_manifest (that package is not importable here)."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise RuntimeError(f"{path}: manifest missing; refusing to load an unverified model (re-export it)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != 1 or manifest.get("algorithm") != "sha256" or not manifest.get("files"):
        raise RuntimeError(f"{path}: unknown manifest format; refusing to load (re-export the model)")
    for rel, entry in manifest["files"].items():
        target = folder / rel
        if not target.is_file():
            raise RuntimeError(f"{target}: listed in {MANIFEST_FILE} but missing; refusing to load")
        digest = hashlib.sha256()
        with open(target, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        if target.stat().st_size != entry["bytes"] or digest.hexdigest() != entry["sha256"]:
            raise RuntimeError(f"{target}: sha256 does not match {MANIFEST_FILE}; the file is corrupted or was "
                               "modified after export, refusing to load")
    return manifest


def _parameter(config, key, default):
    value = config.get("parameters", {}).get(key, {}).get("string_value", "")
    return value if value != "" else default


def _cpu_count():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class TritonPythonModel:
    def initialize(self, args):
        self.logger = pb_utils.Logger
        config = json.loads(args["model_config"])
        self.name = config["name"]
        version_dir = Path(args["model_repository"]) / args["model_version"]
        verify_manifest(version_dir)

        # Threads: intra 0 means "the usable CPUs shared among this model's instances" (2 cores, 1 instance -> 2).
        instances = sum(int(g.get("count", 1)) for g in config.get("instance_group", [])) or 1
        intra = int(_parameter(config, "intra_op_threads", "0")) or max(1, _cpu_count() // instances)
        inter = int(_parameter(config, "inter_op_threads", "1"))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = intra
        options.inter_op_num_threads = inter
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # No busy-waiting between ops: on a small CPU host the spinning threads take cores from the gateway and
        # Triton (measured on 2 cores: stub CPU per image halved at concurrency 1, +15% /analyze throughput at 8).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")

        providers = ["CPUExecutionProvider"]
        if args.get("model_instance_kind") == "GPU":
            if "CUDAExecutionProvider" in ort.get_available_providers():
                device = int(args.get("model_instance_device_id", 0))
                providers = [("CUDAExecutionProvider", {"device_id": device}), "CPUExecutionProvider"]
            else:
                self.logger.log_warn(f"{self.name}: KIND_GPU requested but this onnxruntime has no CUDA provider; "
                                     "running on CPU")
        self.session = ort.InferenceSession(str(version_dir / ONNX_FILE), options, providers=providers)
        shrink = ort.RunOptions()
        shrink.add_run_config_entry(*SHRINK_ARENA)
        self.arena = ArenaShrink(shrink)
        self.input_name = config["input"][0]["name"]
        self.output_names = [o["name"] for o in config["output"]]
        graph_outputs = {o.name for o in self.session.get_outputs()}
        missing = [n for n in self.output_names if n not in graph_outputs]
        if missing:
            raise RuntimeError(f"{self.name}: config.pbtxt outputs {missing} are not in {ONNX_FILE} "
                               f"(graph has {sorted(graph_outputs)}); re-export the model")
        self.logger.log_info(f"{self.name} v{args['model_version']}: manifest verified, ONNX Runtime "
                             f"{ort.__version__} on {self.session.get_providers()[0]}, "
                             f"intra_op_threads={intra} inter_op_threads={inter}")

    def execute(self, requests):
        arrays = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        try:
            batch = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
            outputs = self.session.run(self.output_names, {self.input_name: batch},
                                       self.arena.run_options(len(batch), time.monotonic()))
        except Exception as exc:  # ORT raises its own exception types; fail these requests, keep the model up
            message = f"{self.name}: inference failed: {exc}"
            self.logger.log_error(message)
            return [pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))
                    for _ in requests]
        responses, start = [], 0
        for array in arrays:
            stop = start + len(array)
            tensors = [pb_utils.Tensor(name, np.ascontiguousarray(out[start:stop]))
                       for name, out in zip(self.output_names, outputs)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start = stop
        return responses

    def finalize(self):
        self.session = None
