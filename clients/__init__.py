"""The braintumor SDK and wire contract: :class:`BrainTumorClient` (blocking) and :class:`AsyncBrainTumorClient`
over gRPC or HTTP, their results and exceptions; the gRPC stubs live in ``braintumor.clients.v1``.

    from braintumor.clients import BrainTumorClient
    with BrainTumorClient("localhost:50051") as client:
        print(client.analyze("slice.jpg").label)

Names are imported on first use, so ``braintumor.clients.v1`` (used by the server) does not load httpx or tenacity.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "BrainTumorClient": "client", "ExplainJob": "client", "Image": "client",
    "AsyncBrainTumorClient": "aio", "AsyncExplainJob": "aio",
    "Analysis": "results", "Explanation": "results", "Health": "results",
    "BrainTumorError": "errors", "InvalidInputError": "errors", "AuthenticationError": "errors",
    "OverloadedError": "errors", "UnavailableError": "errors", "DeadlineExceededError": "errors",
    "NotFoundError": "errors", "ServerError": "errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from .aio import AsyncBrainTumorClient, AsyncExplainJob
    from .client import BrainTumorClient, ExplainJob, Image
    from .errors import (AuthenticationError, BrainTumorError, DeadlineExceededError, InvalidInputError,
                         NotFoundError, OverloadedError, ServerError, UnavailableError)
    from .results import Analysis, Explanation, Health
