"""Locust load test of the HTTP gateway (`braintumor serve`, BentoML): a weighted mix of /analyze and /explain.

    locust -f loadtest/locustfile_http.py --host http://localhost:3000                      (web UI on :8089)
    locust -f loadtest/locustfile_http.py --host http://localhost:3000 --headless -u 8 -r 2 -t 30s
    braintumor loadtest --target http --url http://localhost:3000 --users 8 --duration 30s --out runs/load

Mix per user (weights): analyze 20, Grad-CAM explain 4 (POST /explain), LIME explain 1 (small num_samples, as a
BentoML task: /explain/submit, then /explain/status until done, then /explain/get). Each user sends its next
request when the previous one is answered (closed loop), unless ``BRAINTUMOR_LOADTEST_USER_RATE`` sets a constant
throughput per user (tasks/s). Environment: ``BRAINTUMOR_LOADTEST_IMAGES`` (folder of real slices, see
payloads.py), ``BRAINTUMOR_API_KEY`` (sent as ``x-api-key`` when set), ``BRAINTUMOR_LOADTEST_SHAPE`` (``step`` or
``soak``; see shapes.py), ``BRAINTUMOR_LOADTEST_CACHE_BUST`` (``0``: send identical bytes, so repeated explains
are cache hits; default ``1``), ``BRAINTUMOR_LOADTEST_HEATMAP`` (``1``: /analyze asks for the heatmap too; default
``0``), ``BRAINTUMOR_LOADTEST_MASK_FORMAT`` (``rle``: /analyze asks for the mask as COCO RLE; default ``png``).
"""

from __future__ import annotations

import json
import os
import random
import sys
import time

import gevent
from locust import FastHttpUser, task
from locust_common import CACHE_BUST, HEATMAP, MASK_FORMAT, pacing
from payloads import PayloadError, load_payloads, multipart, unique_bytes
from shapes import SHAPE_ENV, locust_shape

try:
    PAYLOADS = load_payloads()
except PayloadError as exc:
    sys.exit(f"locustfile_http: {exc}")

LIME_SAMPLES = 20  # the server's minimum is 10; enough to exercise the batched perturbation path
TASK_POLL_S = 0.25
TASK_TIMEOUT_S = 120.0

if os.environ.get(SHAPE_ENV):
    LoadShape = locust_shape(os.environ[SHAPE_ENV])


class GatewayUser(FastHttpUser):
    wait_time = pacing()
    network_timeout = 120.0
    connection_timeout = 10.0

    def on_start(self) -> None:
        self.rng = random.Random()
        key = os.environ.get("BRAINTUMOR_API_KEY")
        self.auth = {"x-api-key": key} if key else {}

    def _body(self, fields: dict[str, str], fresh: bool) -> tuple[bytes, dict[str, str]]:
        payload = self.rng.choice(PAYLOADS)
        data = unique_bytes(payload, self.rng) if fresh and CACHE_BUST else None
        body, content_type = multipart(fields, payload, data)
        return body, {**self.auth, "content-type": content_type}

    def _post_json(self, path: str, body: bytes, headers: dict, name: str, expect: str) -> dict | None:
        """POST; a non-2xx answer or a body without ``expect`` counts as a failure (with the server's message)."""
        with self.client.post(path, data=body, headers=headers, name=name, catch_response=True) as response:
            return _check(response, expect)

    def _get_json(self, path: str, name: str, expect: str) -> dict | None:
        with self.client.get(path, headers=self.auth, name=name, catch_response=True) as response:
            return _check(response, expect)

    @task(20)
    def analyze(self) -> None:
        fields = {"heatmap": "true"} if HEATMAP else {}
        if MASK_FORMAT != "png":  # the default is not sent, as the SDK does
            fields["mask_format"] = MASK_FORMAT
        body, headers = self._body(fields, fresh=False)  # /analyze has no cache
        self._post_json("/analyze", body, headers, "/analyze", "label")

    @task(4)
    def explain_gradcam(self) -> None:
        body, headers = self._body({"method": "gradcam"}, fresh=True)
        self._post_json("/explain", body, headers, "/explain gradcam", "heatmap_png")

    @task(1)
    def explain_lime_task(self) -> None:
        """LIME through the task routes; besides each request, the whole submit..get is reported as one."""
        start = time.perf_counter()
        error = self._lime_via_task()
        self.environment.events.request.fire(
            request_type="TASK", name="explain lime (submit..get)", response_time=(time.perf_counter() - start) * 1e3,
            response_length=0, exception=error, context={})

    def _lime_via_task(self) -> Exception | None:
        """POST /explain/submit, GET /explain/status until the task is done, GET /explain/get; the first problem."""
        body, headers = self._body({"method": "lime", "num_samples": str(LIME_SAMPLES)}, fresh=True)
        submitted = self._post_json("/explain/submit", body, headers, "/explain/submit lime", "task_id")
        if submitted is None:
            return RuntimeError("submit failed")
        query = f"task_id={submitted['task_id']}"
        status, deadline = submitted.get("status"), time.perf_counter() + TASK_TIMEOUT_S
        while status in ("pending", "in_progress"):
            if time.perf_counter() > deadline:
                return TimeoutError(f"task not done after {TASK_TIMEOUT_S:.0f} s")
            gevent.sleep(TASK_POLL_S)
            answer = self._get_json(f"/explain/status?{query}", "/explain/status", "status")
            if answer is None:
                return RuntimeError("status failed")
            status = answer["status"]
        if status != "completed":
            return RuntimeError(f"task ended {status}")
        if self._get_json(f"/explain/get?{query}", "/explain/get", "heatmap_png") is None:
            return RuntimeError("get failed")
        return None


def _check(response, expect: str) -> dict | None:
    if not 200 <= (response.status_code or 0) < 300:
        response.failure(f"HTTP {response.status_code}: {(response.text or '')[:200]}")
        return None
    try:
        answer = json.loads(response.content)
    except ValueError:
        response.failure(f"answer is not JSON: {(response.text or '')[:200]}")
        return None
    if not isinstance(answer, dict) or expect not in answer:
        response.failure(f"answer has no {expect!r}: {str(answer)[:200]}")
        return None
    response.success()
    return answer
