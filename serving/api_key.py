"""The API key rule both front doors apply: which key a caller presented (HTTP headers or gRPC metadata, the same
names), and which caller it belongs to among the configured keys, compared in constant time.

Keys come from ``BRAINTUMOR_API_KEY`` (one key) and ``BRAINTUMOR_API_KEYS_FILE`` (``name:key`` lines, one caller a
line). A caller is known by a name, never by its key: what is stored with an explanation task is that name.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

ENV_KEY = "BRAINTUMOR_API_KEY"
ENV_KEYS_FILE = "BRAINTUMOR_API_KEYS_FILE"
ENV_CALLER = "env:" + ENV_KEY  # the caller of BRAINTUMOR_API_KEY; file callers are "name:<name>", so never equal
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MIN_FILE_KEY_CHARS = 16
_KEY_CHARS = re.compile(r"[\x21-\x7e]+")  # printable ASCII without spaces: sent as a header value, as is


class KeysFileError(ValueError):
    """A keys file that cannot be used; the message names the file and line, never a key."""


@dataclass(frozen=True)
class ApiKey:
    caller: str  # who: "name:<name>" from the keys file, or ENV_CALLER
    secret: bytes = field(repr=False)


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


class ApiKeys:
    """The configured keys. Empty: no authentication (every caller is anonymous, as before keys existed)."""

    def __init__(self, keys: Sequence[ApiKey] = ()) -> None:
        self._keys = tuple(keys)

    @classmethod
    def load(cls, key: str = "", keys_file: str = "") -> ApiKeys:
        """``key`` (BRAINTUMOR_API_KEY) and the keys of ``keys_file``; a key given twice is refused (it would
        belong to two callers)."""
        keys = [ApiKey(ENV_CALLER, key.encode())] if key else []
        if keys_file:
            for line, entry in read_keys_file(keys_file):
                if key and hmac.compare_digest(entry.secret, keys[0].secret):
                    raise KeysFileError(f"{keys_file}:{line}: this key is also {ENV_KEY}; give each key once")
                keys.append(entry)
        return cls(keys)

    def __bool__(self) -> bool:
        return bool(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def callers(self) -> frozenset[str]:
        return frozenset(k.caller for k in self._keys)

    def caller(self, items: Iterable[tuple[str, str | bytes]]) -> str | None:
        """The caller whose key was presented (see :func:`presented_key`), or None. Every key is compared, in
        constant time, whichever matches: how long it takes says nothing about which key or how much of it."""
        given = presented_key(items).encode("utf-8", "surrogateescape")
        found = None
        for key in self._keys:
            if hmac.compare_digest(given, key.secret) and found is None:
                found = key.caller
        return found if given else None


def read_keys_file(path: str) -> list[tuple[int, ApiKey]]:
    """``(line number, key)`` for each ``name:key`` line of ``path``. Blank lines and ``#`` comments are skipped;
    several keys may share a name (one caller rotating keys). Errors name the file and the line, never the key."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise KeysFileError(f"{ENV_KEYS_FILE} {path}: cannot read it ({reason})") from None
    keys: list[tuple[int, ApiKey]] = []
    seen: dict[bytes, int] = {}
    for number, text in enumerate(lines, start=1):
        text = text.strip()
        if not text or text.startswith("#"):
            continue
        where = f"{path}:{number}"
        name, colon, secret = text.partition(":")
        name, secret = name.strip(), secret.strip()
        if not colon:
            raise KeysFileError(f"{where}: expected `name:key` (a caller name, a colon, its key)")
        if not NAME.fullmatch(name):
            raise KeysFileError(f"{where}: the caller name must be 1-64 letters, digits, '.', '_' or '-', "
                                "starting with a letter or digit")
        if not _KEY_CHARS.fullmatch(secret):
            raise KeysFileError(f"{where}: the key of {name!r} is empty or has characters other than printable "
                                "ASCII without spaces")
        if len(secret) < MIN_FILE_KEY_CHARS:
            raise KeysFileError(f"{where}: the key of {name!r} is shorter than {MIN_FILE_KEY_CHARS} characters; "
                                "draw one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'")
        encoded = secret.encode()
        if encoded in seen:
            raise KeysFileError(f"{where}: the same key as line {seen[encoded]}; give each key once")
        seen[encoded] = number
        keys.append((number, ApiKey("name:" + name, encoded)))
    if not keys:
        raise KeysFileError(f"{ENV_KEYS_FILE} {path}: no `name:key` line; with no key nobody could call the "
                            "service (unset the variable to run without authentication)")
    return keys
