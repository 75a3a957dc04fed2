"""The SDK's exceptions and the one table that maps an HTTP status or a gRPC status code onto them.

Both protocols raise the same classes, so a caller writes one ``except`` whichever door it talks to. Every
exception carries the server's own message in ``detail`` (it says what was wrong and how to fix it).
"""

from __future__ import annotations


class BrainTumorError(Exception):
    """A call failed. ``status``: the HTTP status (None over gRPC or before any answer); ``code``: the gRPC status
    code name (``"INVALID_ARGUMENT"``), else the HTTP error kind the server named (``"bad_input"``) or the HTTP
    reason phrase; ``detail``: the server's message."""

    def __init__(self, detail: str, *, status: int | None = None, code: str = "") -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail

    def __str__(self) -> str:
        where = " ".join(str(part) for part in (self.status, self.code) if part)
        return f"{where}: {self.detail}" if where else self.detail

    def __reduce__(self):  # picklable with the keyword-only fields (process pools, multiprocessing queues)
        return _rebuild, (type(self), self.detail, self.status, self.code)


def _rebuild(cls, detail, status, code):
    return cls(detail, status=status, code=code)


class InvalidInputError(BrainTumorError):
    """The image or an option is unusable; fix the request, do not retry it (400/413/415/422, INVALID_ARGUMENT)."""


class AuthenticationError(BrainTumorError):
    """Missing or wrong API key (401/403, UNAUTHENTICATED/PERMISSION_DENIED)."""


class OverloadedError(BrainTumorError):
    """The server is busy; retry after a short wait (429, RESOURCE_EXHAUSTED)."""


class UnavailableError(BrainTumorError):
    """The server or its model is down (503/502, UNAVAILABLE, connection refused); raised once retries are spent."""


class DeadlineExceededError(BrainTumorError):
    """No answer within the time allowed (504, DEADLINE_EXCEEDED, or the client's own timeout)."""


class NotFoundError(BrainTumorError):
    """No such thing on the server, e.g. an unknown or expired explain task (404, NOT_FOUND)."""


class ServerError(BrainTumorError):
    """A server-side bug (other 5xx, INTERNAL, UNKNOWN); the server logged it."""


HTTP_ERRORS: dict[int, type[BrainTumorError]] = {
    400: InvalidInputError, 413: InvalidInputError, 415: InvalidInputError, 422: InvalidInputError,
    401: AuthenticationError, 403: AuthenticationError,
    404: NotFoundError,
    408: DeadlineExceededError, 504: DeadlineExceededError,
    429: OverloadedError,
    502: UnavailableError, 503: UnavailableError,
}

GRPC_ERRORS: dict[str, type[BrainTumorError]] = {
    "INVALID_ARGUMENT": InvalidInputError, "OUT_OF_RANGE": InvalidInputError, "FAILED_PRECONDITION": InvalidInputError,
    "UNAUTHENTICATED": AuthenticationError, "PERMISSION_DENIED": AuthenticationError,
    "RESOURCE_EXHAUSTED": OverloadedError,
    "UNAVAILABLE": UnavailableError,
    "DEADLINE_EXCEEDED": DeadlineExceededError,
    "NOT_FOUND": NotFoundError,
    "INTERNAL": ServerError, "UNKNOWN": ServerError, "DATA_LOSS": ServerError, "UNIMPLEMENTED": ServerError,
}


def http_error(status: int, detail: str, code: str = "") -> BrainTumorError:
    """The exception for an HTTP error answer; ``code`` is the body's ``error`` kind or the reason phrase."""
    cls = HTTP_ERRORS.get(status) or (ServerError if status >= 500 else BrainTumorError)
    return cls(detail or f"HTTP {status}", status=status, code=code)


def grpc_error(code: str, detail: str) -> BrainTumorError:
    """The exception for a gRPC status code name (``grpc.StatusCode.X.name``) and its message."""
    cls = GRPC_ERRORS.get(code, BrainTumorError)
    if code == "RESOURCE_EXHAUSTED" and "larger than max" in detail:
        cls = InvalidInputError  # the message size limit, not a busy server: retrying cannot help
    return cls(detail or code, code=code)
