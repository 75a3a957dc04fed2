"""The API key rule both front doors apply: which key a caller presented (HTTP headers or gRPC metadata, the same
names) and whether it is the server's, compared in constant time."""

from __future__ import annotations

import hmac
from collections.abc import Iterable


def presented_key(items: Iterable[tuple[str, str | bytes]]) -> str:
    """The key in ``x-api-key``, else in ``authorization: Bearer KEY`` (scheme case-insensitive); "" if none.
    Binary values (gRPC ``-bin`` metadata) are never keys."""
    key = bearer = ""
    for name, value in items:
        if isinstance(value, bytes):
            continue
        name = name.lower()
        if name == "x-api-key" and not key:
            key = value
        elif name == "authorization" and value[:7].lower() == "bearer ":
            bearer = value[7:].strip()
    return key or bearer


def key_accepted(items: Iterable[tuple[str, str | bytes]], key: str) -> bool:
    """True when the caller presented ``key`` (see :func:`presented_key`)."""
    given = presented_key(items)
    return bool(given) and hmac.compare_digest(given.encode(), key.encode())
