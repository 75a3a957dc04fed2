"""The HTTP gateway's front guard (pure ASGI): API-key auth, body size and content-type checks, multipart sanity,
request metrics, and one error shape ``{"error": kind, "detail": message}`` for every refusal on an API route.

BentoML 1.4 has no request-size limit (``api_server.max_request_size`` was removed), answers malformed multipart
with a 500, and shapes its own errors three ways; so each request to an API route is checked here, before BentoML
parses anything, and BentoML's own error bodies are rewritten into the shape the gRPC door and the SDK share.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

from . import explain_tasks
from .errors import (
    KIND_BY_STATUS, BadInput, Busy, NotFound, NotSupported, PayloadTooLarge, RequestTimeout, ServingError,
    Unauthenticated, UnsupportedMediaType,
)
from .logsafe import escape_controls
from .multipart import SCOPE_KEY
from .settings import ServeSettings

# Always open, also when an API key is set: the probes and Prometheus. Everything else needs the key when one is
# set, BentoML's docs too (Swagger UI at /, /docs.json, /schema.json, /static_content/): with a key, nothing but
# health, readiness and metrics answers without it (fetch the spec with the key: curl -H "x-api-key: ..." ...).
OPEN_PATHS = frozenset({"/healthz", "/livez", "/readyz", "/metrics"})
OPEN_PREFIXES: tuple[str, ...] = ()
PROBE_PATHS = OPEN_PATHS  # polled every few seconds: not access-logged
BODY_IDLE_S = 15.0  # longest pause between two pieces of a request body
OTHER_ENDPOINT = "other"  # the metrics label of every path that is no route: a scan of random paths adds no series
BODY_TYPES = ("application/json", "multipart/form-data")
MAX_FORM_VALUE_BYTES = 1024 * 1024  # Starlette's limit for a non-file multipart part (beyond it BentoML answers 500)



@dataclass(frozen=True)
class BodyRoute:
    """What one POST route accepts; ``usage`` ends every refusal so the caller knows how to fix the request."""

    endpoint: str  # metrics label
    files: Mapping[str, bool]  # multipart file field -> several allowed
    fields: frozenset[str]  # other fields: JSON keys or multipart text parts
    usage: str


# Replaces BentoML's access log (off in service.py: it logged raw paths); under "bentoml" so BentoML's logging
# configuration (level, handler, format) applies to it as it did to the original.
access_log = logging.getLogger("bentoml.access")


def error_body(kind: str, detail: str) -> bytes:
    return json.dumps({"error": kind, "detail": detail}).encode()


class GatewayMiddleware:
    def __init__(self, app, routes: Mapping[str, BodyRoute], endpoints: Mapping[str, str],
                 metrics=None, settings: ServeSettings | None = None) -> None:
        """``routes``: POST routes with a body; ``endpoints``: every API path -> metrics label (body-less too)."""
        self.app = app
        self.routes = dict(routes)
        self.endpoints = {**{p: r.endpoint for p, r in routes.items()}, **endpoints}
        self.settings = settings or ServeSettings.from_env()
        self.keys = self.settings.api_keys()  # read once: a changed keys file needs a restart
        self._metrics = metrics
        self.buffered = 0  # body bytes held by the requests in flight in this worker (max_buffered_bytes)
        self._tasks: explain_tasks.TaskStore | None = None  # made on first use: BentoML configures its path

    @property
    def metrics(self):
        return self._metrics() if callable(self._metrics) else self._metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        start = time.perf_counter()
        seen = {"status": 500, "seconds": None}

        async def counted(message) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                # No product banner (BentoML sends `server: BentoML Service/<name>` on API answers).
                message = {**message, "headers": [(k, v) for k, v in message.get("headers", ())
                                                  if k.lower() != b"server"]}
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                seen["seconds"] = time.perf_counter() - start  # background work (BentoML tasks) runs after this
            await send(message)

        if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            try:
                await self.app(scope, receive, counted)
            finally:
                if path not in PROBE_PATHS:
                    _log_access(scope, seen["status"], start)
            return
        held = [0]  # this request's share of self.buffered, given back when it is done
        try:
            body = None
            try:
                caller = self._authenticate(scope)
                # The key goes no further: BentoML stores task requests, headers included, in its task database.
                scope = {**scope, "headers": [(k, v) for k, v in scope.get("headers", ())
                                              if k.lower() not in (b"x-api-key", b"authorization",
                                                                   explain_tasks.CALLER_HEADER)]}
                if path in explain_tasks.REFUSED:
                    raise NotSupported(explain_tasks.REFUSED[path])  # before BentoML: no side effect
                if path in explain_tasks.OWNED:
                    await self._check_owner(scope, caller)
                route = self.routes.get(path)
                if route is not None and scope["method"] == "POST":
                    body, parts = await self._read_body(scope, receive, route, held)
                    if path == explain_tasks.SUBMIT:
                        body, scope = await self._pixels_only(scope, body, parts, caller)
                    elif parts is not None:
                        scope = {**scope, SCOPE_KEY: parts}  # parsed once: the endpoint reads these, not the body
            except ServingError as exc:
                # refused before the whole body was read (a key, a size, the buffer budget, a stall): close the
                # connection, or the server keeps reading a body nobody will use from a client that may stall forever
                await _answer(exc, counted, close=body is None and _has_body(scope))
                return
            usage = self.routes[path].usage if path in self.routes else None
            await self.app(scope, _replay(body) if body is not None else receive, _uniform_errors(counted, usage))
            if path.startswith("/explain/"):
                await self._forget_tasks(scope, path, seen["status"])
        finally:
            self.buffered -= held[0]
            if self.metrics is not None:
                seconds = seen["seconds"] if seen["seconds"] is not None else time.perf_counter() - start
                self.metrics.observe_request(self.endpoints.get(path, OTHER_ENDPOINT), str(seen["status"]), seconds)
            _log_access(scope, seen["status"], start)

    # -- explanation tasks: pixels only, their caller's only, deleted once fetched or expired -------------------

    @property
    def tasks(self) -> explain_tasks.TaskStore:
        if self._tasks is None:
            self._tasks = explain_tasks.TaskStore.of_bentoml(self.settings.explain_task_ttl_s)
        return self._tasks

    async def _pixels_only(self, scope, body: bytes, parts: list | None, caller: str | None):
        """The submission as BentoML will store it: decoded pixels as PNG + options, content headers and the
        caller's name only. ``parts``: the multipart body's parts, parsed once by :meth:`_read_body` (None: JSON)."""
        body = await asyncio.to_thread(explain_tasks.pixels_only, body, parts)
        headers = [(k, v) for k, v in scope.get("headers", ()) if k.lower() == b"host"]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if caller is not None:
            headers.append((explain_tasks.CALLER_HEADER, caller.encode()))
        return body, {**scope, "headers": headers}

    async def _check_owner(self, scope, caller: str | None) -> None:
        """With keys, a task id that is not the caller's (someone else's, fetched, expired or never issued) gets one
        404, before BentoML reads or changes anything."""
        task_id = _task_id(scope)
        if caller is None or task_id is None:
            return
        if await asyncio.to_thread(self.tasks.caller_of, task_id) != caller:
            raise NotFound(explain_tasks.NOT_FOUND)

    async def _forget_tasks(self, scope, path: str, status: int) -> None:
        if path == explain_tasks.GET and status == 200:
            await asyncio.to_thread(self.tasks.delete, _task_id(scope) or "")
        await asyncio.to_thread(self.tasks.purge)

    # -- checks --------------------------------------------------------------------------------------------

    def _authenticate(self, scope) -> str | None:
        """The caller's name (serving/api_key.py), None when no key is configured; Unauthenticated otherwise."""
        if not self.keys:
            return None
        caller = self.keys.caller(_headers(scope).items())
        if caller is None:
            raise Unauthenticated("missing or wrong API key: send it as the `x-api-key` header or as "
                                  "`authorization: Bearer <key>`")
        return caller

    def _hold(self, size: int, held: list[int]) -> None:
        """Count ``size`` more body bytes against the worker's budget, or refuse the request (busy)."""
        budget = self.settings.max_buffered_bytes
        if self.buffered + size > budget:
            raise Busy(f"the server is holding {self.buffered} bytes of other uploads (limit {budget}, "
                       "BRAINTUMOR_MAX_BUFFERED_BYTES); retry after a short wait")
        self.buffered += size
        held[0] += size

    async def _receive(self, receive, deadline: float):
        """The next message, or RequestTimeout when the body stalls BODY_IDLE_S or outlasts body_timeout_s."""
        left = deadline - time.monotonic()
        try:
            return await asyncio.wait_for(receive(), timeout=max(0.0, min(BODY_IDLE_S, left)))
        except asyncio.TimeoutError:
            if left <= BODY_IDLE_S:
                raise RequestTimeout(f"the request body did not arrive within {self.settings.body_timeout_s:g} s "
                                     "(BRAINTUMOR_BODY_TIMEOUT_S); send it in one go") from None
            raise RequestTimeout(f"the request body stalled for {BODY_IDLE_S:g} s; send it in one go") from None

    async def _read_body(self, scope, receive, route: BodyRoute, held: list[int]) -> tuple[bytes, list | None]:
        """The whole body, within the size limit, time limit and the worker's buffer budget, of an accepted
        content type, and its checked multipart parts (None for a JSON body)."""
        headers = _headers(scope)
        limit = self.settings.max_body_bytes
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        if media and media not in BODY_TYPES:
            raise UnsupportedMediaType(f"content type {media!r} is not accepted; {route.usage}")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"request body of {int(declared)} bytes is over the {limit}-byte limit "
                                  "(BRAINTUMOR_MAX_BODY_BYTES); send fewer or smaller images per request")
        if declared.isdigit() and self.buffered + int(declared) > self.settings.max_buffered_bytes:
            self._hold(int(declared), held)  # over the budget: Busy before a byte is read
        deadline = time.monotonic() + self.settings.body_timeout_s
        chunks, size = [], 0
        while True:
            message = await self._receive(receive, deadline)
            if message["type"] == "http.disconnect":
                raise BadInput("the client disconnected before the request body was complete")
            chunk = message.get("body", b"")
            size += len(chunk)
            self._hold(len(chunk), held)
            if size > limit:
                raise PayloadTooLarge(f"request body is over the {limit}-byte limit (BRAINTUMOR_MAX_BODY_BYTES); "
                                      "send fewer or smaller images per request")
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        if media == "multipart/form-data":
            return body, _check_multipart(headers["content-type"], body, route)
        if body and not media:
            raise UnsupportedMediaType(f"the request has a body but no content type; {route.usage}")
        return body, None


def _check_multipart(content_type: str, body: bytes, route: BodyRoute) -> list:
    """The body's parts, parsed once (the endpoints read them from the scope, :data:`.multipart.SCOPE_KEY`); refused
    where BentoML would answer with a 500 or silently ignore: no boundary, unparsable parts, unknown or repeated
    fields, a file where a value belongs, an oversized value."""
    from python_multipart.exceptions import FormParserError

    from .multipart import boundary_of, read_parts

    boundary = boundary_of(content_type)
    if not boundary:
        raise BadInput(f"multipart body without a boundary in its content type; {route.usage}")
    try:
        parts = read_parts(boundary, body)
    except FormParserError as exc:
        raise BadInput(f"malformed multipart body ({exc}); {route.usage}") from exc
    if not parts:
        raise BadInput(f"multipart body without any part; {route.usage}")
    counts: dict[str, int] = {}
    for part in parts:
        opts, name = part.options, part.name
        if not name:
            raise BadInput(f"a multipart part has no field name; {route.usage}")
        counts[name] = counts.get(name, 0) + 1
        if name in route.files:
            if counts[name] > 1 and not route.files[name]:
                raise BadInput(f"field {name!r} holds one file, got several; {route.usage}")
        elif name in route.fields:
            if b"filename" in opts:
                raise BadInput(f"field {name!r} takes a plain form value, not a file; {route.usage}")
            if len(part.data) > MAX_FORM_VALUE_BYTES:
                raise BadInput(f"form value {name!r} is over {MAX_FORM_VALUE_BYTES} bytes; send images as file "
                               f"parts; {route.usage}")
        else:
            raise BadInput(f"unknown field {name!r}; {route.usage}")
    return parts


# -- ASGI helpers ----------------------------------------------------------------------------------------------

def _log_access(scope, status: int, start: float) -> None:
    """One line per request; the path is the caller's text, so its control characters are escaped (logsafe)."""
    client = scope.get("client") or ("-", 0)
    access_log.info("%s:%s %s %s %s %.1f ms", client[0], client[1], escape_controls(scope.get("method", "-")),
                    escape_controls(scope.get("path", "")), status, (time.perf_counter() - start) * 1000)


def _task_id(scope) -> str | None:
    """The ``task_id`` BentoML will read (Starlette's query parser, the same one); refused if given twice, so the
    id checked here is the id BentoML uses."""
    from starlette.datastructures import QueryParams

    ids = QueryParams(scope.get("query_string", b"")).getlist("task_id")
    if len(ids) > 1:
        raise BadInput("give task_id once")
    return ids[0] if ids else None


def _headers(scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}


def _replay(body: bytes):
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive


def _has_body(scope) -> bool:
    """The request announced a body (a length over 0, or chunked)."""
    headers = _headers(scope)
    length = headers.get("content-length", "0").strip()
    return "transfer-encoding" in headers or not length.isdigit() or int(length) > 0


async def _answer(error: ServingError, send, close: bool = False) -> None:
    body = error_body(error.kind, error.message)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if error.http_status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="braintumor"'))
    if error.retry_after_s:
        headers.append((b"retry-after", str(error.retry_after_s).encode()))
    if close or error.http_status in (408, 413):  # the rest of the body may still be coming: do not keep it open
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": error.http_status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _uniform_errors(send, usage: str | None):
    """Pass answers through; rewrite an error body that is not already ``{"error": str, "detail": str}``."""
    held: dict = {}

    async def wrapped(message) -> None:
        if message["type"] == "http.response.start":
            if message["status"] < 400:
                await send(message)
                return
            held["start"], held["body"] = message, b""
            return
        if message["type"] != "http.response.body" or "start" not in held:
            await send(message)
            return
        held["body"] += message.get("body", b"")
        if message.get("more_body"):
            return
        start, body = held.pop("start"), held.pop("body")
        body = _rewrite(start["status"], body, usage)
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() not in (b"content-length", b"content-type")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return wrapped


def _rewrite(status: int, body: bytes, usage: str | None = None) -> bytes:
    try:
        data = json.loads(body) if body else None
    except ValueError:
        data = body.decode("utf-8", "replace").strip() or None
    if isinstance(data, dict) and isinstance(data.get("error"), str) and isinstance(data.get("detail"), str):
        return body  # already ours
    kind = KIND_BY_STATUS.get(status, "internal" if status >= 500 else "bad_request")
    if isinstance(data, list) and len(data) == 1 and isinstance(data[0], dict):
        data = data[0]  # BentoMLException with a 4xx: BentoML answers [{"error": message}]
    if isinstance(data, dict) and isinstance(data.get("detail"), list):  # pydantic validation errors
        detail = "; ".join(_validation_message(e) for e in data["detail"] if isinstance(e, dict))
    elif isinstance(data, dict):
        detail = str(data.get("error") or data.get("detail") or "")
    else:
        detail = str(data or "")
    if status >= 500 and kind == "internal":
        detail = "an unexpected error occurred; it is logged on the server"
    elif status == 400 and usage:
        detail = f"{detail}; {usage}" if detail else usage
    return error_body(kind, detail or f"HTTP {status}")


def _validation_message(error: dict) -> str:
    where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
    message = str(error.get("msg", "invalid value"))
    return f"{where}: {message}" if where else message
