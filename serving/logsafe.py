"""Log lines nobody can forge, and client errors that do not look like server failures.

Every serving process calls :func:`install` once: each log record's message is rendered and its control characters
escaped (a request path ``/probe%0a<fake line>%00`` is logged as ``/probe\\x0a<fake line>\\x00``), whichever
library logs it. Tracebacks are formatted later by the handler and keep their line breaks.
"""

from __future__ import annotations

import logging
import re

# C0 and C1 controls, DEL, and the Unicode line/paragraph separators some log viewers break lines on.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_installed = False


def escape_controls(text: str) -> str:
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}",
                        text)


def install() -> None:
    """Escape control characters in every log record made from now on in this process (idempotent)."""
    global _installed
    if _installed:
        return
    make_record = logging.getLogRecordFactory()

    def escaped_record(*args, **kwargs) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string: let the handler report it as logging does
            return record
        if _CONTROL.search(message):
            record.msg, record.args = escape_controls(message), None
        return record

    logging.setLogRecordFactory(escaped_record)
    _installed = True


class ClientErrorsAtInfo(logging.Filter):
    """BentoML 1.4 logs every refused request (validation errors, 4xx BentoMLExceptions) at ERROR with a traceback
    ("Exception on /analyze [POST]"). A caller's mistake is not a server failure: INFO, one line, no traceback.
    Anything else (5xx, unexpected exceptions) passes unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and _is_client_error(exc):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg = f"{record.getMessage()}: {type(exc).__name__} (answered {_status(exc)})"
            record.args, record.exc_info, record.exc_text = None, None, None
        return True


def _status(exc: BaseException) -> int:
    code = getattr(exc, "error_code", None)
    return int(code) if code is not None else 400  # pydantic's ValidationError: BentoML answers 400


def _is_client_error(exc: BaseException) -> bool:
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return True
    code = getattr(exc, "error_code", None)
    try:
        return code is not None and 400 <= int(code) < 500
    except (TypeError, ValueError):
        return False


# The logger BentoML's ``log_exception`` writes to (bentoml/_internal/server/http_app.py).
BENTOML_REQUEST_LOGGER = "bentoml._internal.server.http_app"


def quiet_client_errors() -> None:
    logger = logging.getLogger(BENTOML_REQUEST_LOGGER)
    if not any(isinstance(f, ClientErrorsAtInfo) for f in logger.filters):
        logger.addFilter(ClientErrorsAtInfo())
