"""The failures a caller can get from the serving pipeline, each with its HTTP status and gRPC code.

Both front doors map these one way: HTTP answers ``http_status`` with ``{"error": kind, "detail": message}``,
gRPC aborts with ``grpc_code``. Messages say what was wrong and what is accepted; they never echo image bytes.
"""

from __future__ import annotations


class ServingError(Exception):
    http_status = 500
    grpc_code = "INTERNAL"  # grpc.StatusCode member name; grpc is not imported here
    kind = "internal"
    # Seconds after which a retry may succeed: HTTP's Retry-After, gRPC's retry-after and grpc-retry-pushback-ms.
    retry_after_s: int | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadInput(ServingError):
    """The request or image is unusable (bad bytes, bad option): 400 / INVALID_ARGUMENT."""

    http_status = 400
    grpc_code = "INVALID_ARGUMENT"
    kind = "bad_input"


class PayloadTooLarge(BadInput):
    http_status = 413
    kind = "payload_too_large"


class UnsupportedMediaType(BadInput):
    http_status = 415
    kind = "unsupported_media_type"


class RequestTimeout(BadInput):
    """The body did not arrive in time (HTTP only: gRPC has its own deadlines)."""

    http_status = 408
    kind = "request_timeout"


class NotSupported(BadInput):
    """A route that exists but refuses the method (explanation retry/cancel), before any side effect."""

    http_status = 405
    kind = "not_supported"


class Unauthenticated(ServingError):
    http_status = 401
    grpc_code = "UNAUTHENTICATED"
    kind = "unauthenticated"


class NotFound(ServingError):
    http_status = 404
    grpc_code = "NOT_FOUND"
    kind = "not_found"


class Busy(ServingError):
    """Too many requests are already queued: 429 / RESOURCE_EXHAUSTED. Retry later."""

    http_status = 429
    grpc_code = "RESOURCE_EXHAUSTED"
    kind = "busy"
    retry_after_s = 1


class Unavailable(ServingError):
    """Triton is down or the model is not loaded: 503 / UNAVAILABLE. Safe to retry."""

    http_status = 503
    grpc_code = "UNAVAILABLE"
    kind = "unavailable"
    retry_after_s = 1


class DeadlineExceeded(ServingError):
    """Triton (or the call's own deadline) did not answer in time: 504 / DEADLINE_EXCEEDED."""

    http_status = 504
    grpc_code = "DEADLINE_EXCEEDED"
    kind = "deadline_exceeded"


class UpstreamError(ServingError):
    """Triton failed in a way a retry cannot fix (a model bug, a model not exported by braintumor): 500 / INTERNAL.

    The front doors log it with its traceback; the SDK does not retry it."""

    http_status = 500
    grpc_code = "INTERNAL"
    kind = "internal"


def _kinds() -> dict[int, str]:
    """HTTP status -> error kind, from the classes above (the first class with a status names it)."""
    table: dict[int, str] = {}
    pending = [ServingError]
    while pending:
        cls = pending.pop(0)
        table.setdefault(cls.http_status, cls.kind)
        pending += cls.__subclasses__()
    return table


# The kind of an error answer produced by something else (BentoML, Starlette) with one of our statuses.
KIND_BY_STATUS: dict[int, str] = _kinds()
