"""The HTTP side of the SDK: one ``httpx.AsyncClient`` per client object, the gateway's routes, and its error body
``{"error": kind, "detail": message}`` turned into the SDK's exceptions. No retries here (see :mod:`.aio`)."""

from __future__ import annotations

import json
from http import HTTPStatus

import httpx

from .errors import BrainTumorError, DeadlineExceededError, UnavailableError, http_error
from .masks import requested
from .multipart import encode
from .results import Analysis, Explanation, Health

API_KEY_HEADER = "x-api-key"  # serving/http_middleware.py also accepts `authorization: Bearer KEY`
PROBE_TIMEOUT_S = 5.0


def normalise_url(url: str) -> str:
    """``host:port`` -> ``http://host:port``; a scheme is kept; a trailing slash is dropped."""
    url = url.strip().rstrip("/")
    if url.startswith(("grpc://", "grpcs://")):
        url = ("https://" if url.startswith("grpcs://") else "http://") + url.split("://", 1)[1]
    return url if url.startswith(("http://", "https://")) else f"http://{url}"


def _explain_fields(method: str, target: str | None, num_samples: int | None, max_evals: int | None) -> dict:
    fields = {"method": method, "target": target, "num_samples": num_samples, "max_evals": max_evals}
    return {k: str(v) for k, v in fields.items() if v is not None}


def _form(fields: dict[str, str], data: bytes) -> dict:
    """The request keywords of a multipart body with ``fields`` and the image file ``image``."""
    body, content_type = encode(fields, "image", data)
    return {"content": body, "headers": {"content-type": content_type}}


class HttpTransport:
    def __init__(self, url: str, api_key: str | None, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.url = normalise_url(url)
        self._headers = {API_KEY_HEADER: api_key} if api_key else {}
        self._transport = transport
        self._client: httpx.AsyncClient | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        # Made on first use, inside the running event loop (an AsyncClient is bound to the loop that uses it).
        if self._client is None:
            self._client = httpx.AsyncClient(base_url=self.url, headers=self._headers, transport=self._transport)
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _request(self, method: str, path: str, timeout: float, **kw) -> httpx.Response:
        try:
            response = await self.client.request(method, path, timeout=timeout, **kw)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise UnavailableError(f"cannot connect to {self.url}: {exc or type(exc).__name__}") from exc
        except httpx.TimeoutException as exc:
            raise DeadlineExceededError(f"no answer from {self.url}{path} within {timeout:.1f} s",
                                        code="client_timeout") from exc
        except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:
            raise UnavailableError(f"connection to {self.url} failed: {exc or type(exc).__name__}") from exc
        if response.status_code >= 400:
            raise _error(response)
        return response

    async def analyze(self, data: bytes, overlay: bool, timeout: float, heatmap: bool = False,
                      mask_format: str = "png", dicom: bool = False) -> Analysis:
        fields = {"overlay": "true" if overlay else "false", "heatmap": "true" if heatmap else "false"}
        if dicom:
            fields["dicom"] = "true"
        if requested(mask_format):
            fields["mask_format"] = mask_format
        response = await self._request("POST", "/analyze", timeout, **_form(fields, data))
        return Analysis.from_json(response.json())

    async def explain(self, data: bytes, timeout: float, method: str, target: str | None = None,
                      num_samples: int | None = None, max_evals: int | None = None) -> Explanation:
        response = await self._request("POST", "/explain", timeout,
                                       **_form(_explain_fields(method, target, num_samples, max_evals), data))
        return Explanation.from_json(response.json())

    async def submit_explain(self, data: bytes, timeout: float, method: str, target: str | None = None,
                             num_samples: int | None = None, max_evals: int | None = None) -> str:
        """The BentoML task id of a submitted explanation."""
        response = await self._request("POST", "/explain/submit", timeout,
                                       **_form(_explain_fields(method, target, num_samples, max_evals), data))
        return response.json()["task_id"]

    async def task_status(self, task_id: str, timeout: float) -> str:
        """``in_progress``, ``completed``, ``failed`` or ``canceled`` (BentoML's task states)."""
        response = await self._request("GET", "/explain/status", timeout, params={"task_id": task_id})
        return response.json()["status"]

    async def task_result(self, task_id: str, timeout: float) -> Explanation:
        """A finished task's explanation; a failed task raises its error (e.g. 400 for a bad option)."""
        response = await self._request("GET", "/explain/get", timeout, params={"task_id": task_id})
        return Explanation.from_json(response.json())

    async def model(self, timeout: float) -> dict:
        return (await self._request("GET", "/model", timeout)).json()

    async def health(self, timeout: float) -> Health:
        timeout = min(timeout, PROBE_TIMEOUT_S)
        try:
            await self._request("GET", "/healthz", timeout)
        except BrainTumorError:
            return Health(live=False, ready=False)
        try:
            await self._request("GET", "/readyz", timeout)
        except BrainTumorError:
            return Health(live=True, ready=False)
        try:
            model = await self.model(timeout)
        except BrainTumorError:  # e.g. an API key the probes did not need
            model = None
        return Health(live=True, ready=True, model=model)


def _error(response: httpx.Response) -> BrainTumorError:
    """The gateway's ``{"error": kind, "detail": message}`` as an exception; any other body as its text."""
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    try:
        reason = HTTPStatus(response.status_code).phrase
    except ValueError:
        reason = ""
    if isinstance(body, dict) and ("detail" in body or "error" in body):
        detail = str(body.get("detail") or body.get("error") or "")
        code = str(body.get("error") or reason) if "detail" in body else reason
        return http_error(response.status_code, detail, code)
    return http_error(response.status_code, response.text.strip()[:500], reason)
