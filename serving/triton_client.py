"""The gateway's one connection to Triton: tritonclient's gRPC asyncio client, created once and reused.

It reads the model's metadata (classes, preprocessing, refer threshold) from the model config parameters that
`braintumor export` writes, so an external Triton (`--triton-url`) needs no local copy of the repository, and it
turns Triton's failures into the precise serving error (:data:`TRITON_ERRORS`): unavailable -> 503, deadline ->
504, a request Triton refused -> 400, anything else -> 500 (never retried).
"""

from __future__ import annotations

import asyncio

import numpy as np

from ..export.contract import CLASS_PROBS, INPUT_NAME, classifier_name
from .backend import ModelInfo, chunks
from .errors import BadInput, DeadlineExceeded, ServingError, Unavailable, UpstreamError
from .settings import TRITON_GRPC_KEY_HEADER

# Triton's gRPC status (tritonclient's ``exc.status()`` is "StatusCode.<name>") -> the serving error it becomes.
# Any other status, or none (a client-side failure), is an UpstreamError: 500 / INTERNAL, not retried.
TRITON_ERRORS: dict[str, type[ServingError]] = {
    "UNAVAILABLE": Unavailable,  # Triton down, starting or stopping; the connection refused or lost
    "CANCELLED": Unavailable,  # Triton cancelled the call while shutting down
    "NOT_FOUND": Unavailable,  # the model is not loaded (being reloaded or not in the repository): /readyz says so
    "DEADLINE_EXCEEDED": DeadlineExceeded,
    "INVALID_ARGUMENT": BadInput,  # Triton refused the request (shape, dtype, batch size)
    "OUT_OF_RANGE": BadInput,
}


class TritonModel:
    """Async access to the full model and its classifier-only twin on one Triton server (a
    :class:`~.backend.ModelBackend`)."""

    def __init__(self, url: str, model_name: str, model_version: str = "", timeout_s: float = 30.0,
                 key: str = "") -> None:
        """``key``: sent on every call but health, as the header Triton's restricted APIs need
        (:meth:`ServeSettings.triton_client_key`)."""
        self.url = url
        self.headers = {TRITON_GRPC_KEY_HEADER: key} if key else {}
        self.model_name = model_name
        self.classifier_name = classifier_name(model_name)
        self.model_version = model_version
        self.timeout_s = timeout_s
        self._client = None
        self._info: ModelInfo | None = None
        self._lock = asyncio.Lock()

    def _connection(self):
        if self._client is None:
            from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE
            from tritonclient.grpc import aio as grpcaio

            self._client = grpcaio.InferenceServerClient(self.url, channel_args=[
                ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
                ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
                # Reconnect within about a second after Triton comes back (gRPC's default backoff grows to 120 s).
                ("grpc.initial_reconnect_backoff_ms", 200),
                ("grpc.min_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", 1000),
            ])
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

    async def ready(self) -> bool:
        """True when Triton answers, and both the model and the classifier are loaded."""
        try:
            client = self._connection()
            return bool(await client.is_server_ready(client_timeout=2.0)
                        and await client.is_model_ready(self.model_name, self.model_version, client_timeout=2.0)
                        and await client.is_model_ready(self.classifier_name, self.model_version, client_timeout=2.0))
        except Exception:  # noqa: BLE001 - any failure to answer means "not ready"
            return False

    async def info(self) -> ModelInfo:
        """The model's metadata, fetched once (and again after Triton comes back with a new version)."""
        if self._info is not None:
            return self._info
        async with self._lock:
            if self._info is None:
                from tritonclient.utils import InferenceServerException

                client = self._connection()
                try:
                    response = await client.get_model_config(self.model_name, self.model_version, as_json=True,
                                                              headers=self.headers, client_timeout=self.timeout_s)
                    metadata = await client.get_model_metadata(self.model_name, self.model_version, as_json=True,
                                                               headers=self.headers, client_timeout=self.timeout_s)
                except InferenceServerException as exc:
                    raise _translate(exc, f"model {self.model_name!r}") from exc
                versions = metadata.get("versions") or [""]
                self._info = ModelInfo.from_config(response["config"], version=str(max(versions, key=_version_key)))
        return self._info

    def forget_info(self) -> None:
        self._info = None

    async def infer(self, images: np.ndarray, info: ModelInfo | None = None) -> dict[str, np.ndarray]:
        """Full model on a (N, 1, S, S) uint8 batch -> {class_probs, mask_prob, cam[, ood_score]}; split at
        max_batch_size. ``info``: the model info the caller already holds (else it is read here)."""
        info = info or await self.info()
        parts = [await self._infer(self.model_name, chunk, info.outputs)
                 for chunk in chunks(images, info.max_batch_size)]
        if len(parts) == 1:  # the usual case: no copy
            return parts[0]
        return {name: np.concatenate([p[name] for p in parts]) for name in info.outputs}

    async def classify(self, images: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """Classifier-only model on a (N, 1, S, S) uint8 batch -> (N, num_classes) calibrated probabilities.

        Chunks are sent concurrently, so Triton's dynamic batcher can run them back to back.
        """
        info = await self.info()
        size = min(batch_size or info.max_batch_size, info.max_batch_size)
        parts = await asyncio.gather(*(self._infer(self.classifier_name, chunk, (CLASS_PROBS,))
                                       for chunk in chunks(images, size)))
        return np.concatenate([p[CLASS_PROBS] for p in parts])

    async def _infer(self, model: str, images: np.ndarray, outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
        from tritonclient.grpc import InferInput, InferRequestedOutput
        from tritonclient.utils import InferenceServerException

        batch = np.ascontiguousarray(images, dtype=np.uint8)
        tensor = InferInput(INPUT_NAME, list(batch.shape), "UINT8")
        tensor.set_data_from_numpy(batch)
        try:
            result = await self._connection().infer(
                model, [tensor], model_version=self.model_version,
                outputs=[InferRequestedOutput(name) for name in outputs], headers=self.headers,
                client_timeout=self.timeout_s)
        except InferenceServerException as exc:
            raise _translate(exc, f"inference on {model!r}") from exc
        except asyncio.TimeoutError as exc:
            raise DeadlineExceeded(f"Triton did not answer {model!r} within {self.timeout_s:g} s") from exc
        return {name: result.as_numpy(name) for name in outputs}


def _translate(exc, what: str) -> ServingError:
    """The serving error for a tritonclient ``InferenceServerException`` (see :data:`TRITON_ERRORS`)."""
    status = str(exc.status() or "").removeprefix("StatusCode.")
    if "is restricted" in (exc.message() or ""):
        # Triton answers a missing or wrong restricted-API key with UNAVAILABLE; retrying would not help: it is
        # this server's configuration, not Triton's state
        return UpstreamError(f"{what}: Triton refused this server's key for its inference API; start the front "
                             "doors with the BRAINTUMOR_TRITON_KEY (or _FILE) that Triton was started with")
    kind = TRITON_ERRORS.get(status, UpstreamError)
    if kind is Unavailable:
        return Unavailable(f"{what}: Triton is not reachable or the model is not loaded ({exc.message()}); "
                           "retry when /readyz says ready")
    if kind is DeadlineExceeded:
        return DeadlineExceeded(f"{what}: Triton did not answer in time ({exc.message()})")
    if kind is BadInput:
        return BadInput(f"{what}: Triton refused the request ({exc.message()}); check that the image is one "
                        "JPEG, PNG or DICOM slice and the model is the one this server was exported for")
    return UpstreamError(f"{what} failed in Triton ({status or 'no status'}): {exc.message()}")


def _version_key(version: str):
    return (0, int(version)) if str(version).isdigit() else (1, str(version))

