"""What the gateway keeps of an explanation task (/explain/submit): the slice's pixels and the options, nothing else,
for as long as it takes to fetch the result.

BentoML stores each submitted request (body and headers) in its SQLite task store and keeps results 24 h. So a
submission is rewritten before BentoML sees it: the image is decoded (JPEG, PNG, DICOM) and re-encoded as a
lossless greyscale PNG of the same pixels (no DICOM header, no file name, no EXIF), and only the content headers
are kept. A task's row is deleted once its result has been fetched, and every row after ``ttl_s``. Retry and
cancel are refused: a retry would re-run the stored request, and BentoML's cancel only relabels the row.

With API keys, a task belongs to the caller that submitted it: the caller's name (serving/api_key.py, never the key)
is stored as a header of the rewritten submission, in the same row, so it lives and dies with the task. Status and
result are answered only to that caller; any other task id gets one 404, whether it exists or not.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import sqlite3
import time

from .errors import BadInput, UnsupportedMediaType

log = logging.getLogger("braintumor.serving.tasks")

SUBMIT = "/explain/submit"
GET = "/explain/get"
OWNED = frozenset({"/explain/status", GET})  # answered only to the task's caller when keys are set
CALLER_HEADER = b"x-braintumor-caller"  # stored with the submission; a caller's own header of that name is dropped
NOT_FOUND = ("no task with this task_id for your API key (a task is visible only to the key that submitted it, "
             "until its result is fetched or BRAINTUMOR_EXPLAIN_TASK_TTL_S passes)")
REFUSED = {
    "/explain/retry": "explanation tasks cannot be retried: submit the image again (a repeated image is answered "
                      "from the cache)",
    "/explain/cancel": "explanation tasks cannot be cancelled; an unfetched result is deleted after "
                       "BRAINTUMOR_EXPLAIN_TASK_TTL_S",
}
_OPTION_FIELDS = ("method", "target", "num_samples", "max_evals")


def pixels_only(body: bytes, parts: list | None) -> bytes:
    """The JSON body of a submission that carries only the decoded pixels (as PNG) and the explanation options.
    ``parts``: a multipart body's parts as the gateway's guard parsed them (:mod:`.multipart`), else None (JSON).

    Raises BadInput / UnsupportedMediaType for what cannot be decoded, before anything is stored."""
    from ..train.decode import ImageDecodeError, UnsupportedFormatError, decode_any

    fields, image = _fields_and_image(body, parts)
    try:
        decoded, _ = decode_any(image)
    except UnsupportedFormatError as exc:
        raise UnsupportedMediaType(str(exc)) from exc
    except ImageDecodeError as exc:
        raise BadInput(str(exc)) from exc
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(decoded.pixels).save(buf, format="PNG", compress_level=1)
    return json.dumps({**fields, "image_base64": base64.b64encode(buf.getvalue()).decode()}).encode()


def _fields_and_image(body: bytes, parts: list | None) -> tuple[dict, bytes]:
    if parts is not None:
        parts = {part.name: bytes(part.data) for part in parts}
        fields = {k: v.decode("utf-8", "replace") for k, v in parts.items() if k in _OPTION_FIELDS}
        image = parts.get("image")
    else:
        try:
            data = json.loads(body or b"{}")
        except ValueError as exc:
            raise BadInput(f"the body is not valid JSON ({exc.msg})") from exc
        if not isinstance(data, dict):
            raise BadInput("the JSON body must be an object")
        fields = {k: data[k] for k in _OPTION_FIELDS if k in data}
        text = data.get("image_base64")
        image = None
        if isinstance(text, str):
            if text.startswith("data:") and "," in text[:200]:
                text = text.split(",", 1)[1]
            try:
                image = base64.b64decode("".join(text.split()), validate=True)
            except (binascii.Error, ValueError) as exc:
                raise BadInput(f"image_base64 is not valid base64 ({exc})") from exc
    if not image:
        raise BadInput('no image in the request: send the file in multipart field "image" or base64 in JSON '
                       '"image_base64"')
    return fields, image


class TaskStore:
    """Deletes rows from BentoML 1.4's task store (SQLite, table ``result``; the path BentoML uses)."""

    def __init__(self, path: str, ttl_s: float, purge_every_s: float | None = None) -> None:
        self.path, self.ttl_s = path, ttl_s
        self.purge_every_s = min(30.0, ttl_s / 2) if purge_every_s is None else purge_every_s
        self._last_purge = 0.0

    @classmethod
    def of_bentoml(cls, ttl_s: float) -> TaskStore:
        from bentoml._internal.configuration.containers import BentoMLContainer

        return cls(BentoMLContainer.result_store_file.get(), ttl_s)

    def _execute(self, sql: str, params: tuple) -> int:
        return self._run(sql, params, lambda cursor: cursor.rowcount) or 0

    def _run(self, sql: str, params: tuple, read):
        if self.path == ":memory:":
            return None
        try:
            with sqlite3.connect(self.path, timeout=10) as conn:
                return read(conn.execute(sql, params))
        except sqlite3.OperationalError as exc:  # no table yet (no task submitted), or locked for 10 s
            log.warning("task store %s: %s", self.path, exc)
            return None

    def delete(self, task_id: str) -> bool:
        return self._execute("DELETE FROM result WHERE task_id = ?", (task_id,)) > 0

    def caller_of(self, task_id: str) -> str | None:
        """The caller stored with ``task_id``'s submission (:data:`CALLER_HEADER`), or None: no such task, or it was
        submitted without one (before keys were configured)."""
        row = self._run("SELECT input FROM result WHERE task_id = ?", (task_id,), lambda cursor: cursor.fetchone())
        if row is None:
            return None
        try:  # BentoML's JSONSerde: {"scope": {"headers": [[name, value], ...]}, "content": base64}
            headers = json.loads(row[0])["scope"]["headers"]
            callers = [value for name, value in headers if name.lower() == CALLER_HEADER.decode()]
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("task store %s: unreadable request row (%s)", self.path, type(exc).__name__)
            return None
        return callers[0] if len(callers) == 1 else None

    def purge(self, now: float | None = None) -> int:
        """Delete every task older than ``ttl_s`` (at most once per ``purge_every_s``); how many were deleted."""
        now = time.monotonic() if now is None else now
        if now - self._last_purge < self.purge_every_s:
            return 0
        self._last_purge = now
        return self._execute("DELETE FROM result WHERE created_at < datetime('now', ?)",
                             (f"-{int(self.ttl_s)} seconds",))
