"""The HTTP gateway as an outsider meets it (issue 13), `bentoml serve` with an API key against the tiny model: every
route but the probes, metrics and docs needs the key; a forged path cannot forge a log line nor add metric series;
no product banner; a refused request is one INFO line, not an ERROR with a traceback; only JPEG/PNG/DICOM decode."""

import base64
import io
import re
import select
import socket
import time

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("bentoml")
pytest.importorskip("tritonclient.grpc.aio")

from PIL import Image  # noqa: E402

pytestmark = pytest.mark.integration

KEY = "s3cret-key"
AUTH = {"x-api-key": KEY}


@pytest.fixture(scope="module")
def gateway(tiny_triton, tmp_path_factory, running_gateway):
    with running_gateway(tmp_path_factory.mktemp("gateway_security"), tiny_triton,
                         BRAINTUMOR_API_KEY=KEY) as gw:
        yield gw


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# Every API route the gateway has (service.BODY_ROUTES + OTHER_ENDPOINTS), and paths that are no route.
GUARDED = [
    ("POST", "/analyze"), ("POST", "/analyze_batch"), ("POST", "/explain"), ("POST", "/explain/submit"),
    ("GET", "/explain/status?task_id=x"), ("GET", "/explain/get?task_id=x"), ("POST", "/explain/retry?task_id=x"),
    ("PUT", "/explain/cancel?task_id=x"), ("GET", "/model"), ("GET", "/v2/models/brain_tumor"),
    ("POST", "/v2/models/brain_tumor/infer"), ("GET", "/no/such/route"), ("GET", "/"), ("GET", "/docs.json"),
    ("GET", "/schema.json"), ("GET", "/static_content/swagger-ui.css"),
]
OPEN = ["/healthz", "/livez", "/readyz", "/metrics"]


def test_every_route_needs_the_key(gateway, slice_jpeg):
    from braintumor.serving.service import BODY_ROUTES, OTHER_ENDPOINTS

    covered = {path.split("?")[0] for _, path in GUARDED}
    assert set(BODY_ROUTES) | set(OTHER_ENDPOINTS) <= covered, "a route was added without a key check here"
    for method, path in GUARDED:
        refused = httpx.request(method, gateway.url + path, json={"image_base64": _b64(slice_jpeg)}, timeout=30)
        assert refused.status_code == 401, (method, path, refused.status_code, refused.text)
        assert refused.json()["error"] == "unauthenticated"
    for path in OPEN:
        assert gateway.get(path).status_code == 200, path
    # with the key, the docs and their static files answer
    for path in ("/", "/docs.json", "/static_content/swagger-ui.css"):
        assert gateway.get(path, headers=AUTH).status_code == 200, path
    # a path that climbs out of the static files, sent as is, is no way around the key either
    assert _raw_get(gateway.url, b"/static_content/../analyze").startswith(b"HTTP/1.1 401")


def test_with_the_key_the_api_answers(gateway, slice_jpeg):
    assert gateway.post("/analyze", json={"image_base64": _b64(slice_jpeg)}, headers=AUTH).status_code == 200
    assert gateway.get("/model", headers={"authorization": f"Bearer {KEY}"}).status_code == 200


def _raw_get(url: str, raw_path: bytes) -> bytes:
    """A request line sent byte for byte (httpx would re-encode the path)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GET " + raw_path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_a_forged_path_writes_no_log_line_and_no_metric_series(gateway):
    answer = _raw_get(gateway.url, b"/probe%0aFORGED%20200%20OK%20admin%20login%00%1b%5b31m")
    assert answer.startswith(b"HTTP/1.1 401")
    for k in range(30):
        assert gateway.get(f"/scan-{k}/wp-login.php").status_code == 401
    log = gateway.log.read_text(errors="replace")
    assert not any(line.startswith("FORGED") for line in log.splitlines()), "a request path forged a log line"
    assert "\x00" not in log and "\x1b" not in log
    assert "/probe\\x0aFORGED 200 OK admin login\\x00\\x1b[31m" in log  # logged, escaped
    metrics = gateway.get("/metrics").text
    assert "scan-" not in metrics and "probe" not in metrics and "wp-login" not in metrics
    endpoints = set(re.findall(r'endpoint="([^"]*)"', metrics))
    from braintumor.serving.service import BODY_ROUTES, OTHER_ENDPOINTS

    known = {r.endpoint for r in BODY_ROUTES.values()} | set(OTHER_ENDPOINTS.values()) | {"other"}
    assert endpoints <= known, endpoints - known
    assert re.search(r'braintumor_requests_total\{[^}]*endpoint="other"[^}]*status="401"[^}]*\} ([0-9.]+)', metrics)


def test_no_product_banner(gateway, slice_jpeg):
    answers = [gateway.post("/analyze", json={"image_base64": _b64(slice_jpeg)}, headers=AUTH),
               gateway.post("/analyze", json={"overlay": "maybe"}, headers=AUTH),  # BentoML's own 400
               gateway.get("/healthz"), gateway.get("/metrics"), gateway.get("/docs.json", headers=AUTH),
               gateway.get("/nope")]
    for answer in answers:
        assert "server" not in answer.headers, (answer.request.url, answer.headers.get("server"))


def test_client_errors_are_logged_at_info_without_a_traceback(gateway):
    before = len(gateway.log.read_text(errors="replace"))
    refused = gateway.post("/analyze", json={"image_base64": "aGVsbG8=", "overlay": "maybe"}, headers=AUTH)
    assert refused.status_code == 400, refused.text  # pydantic validation inside BentoML
    refused = gateway.post("/analyze", json={"unknown_field": 1}, headers=AUTH)
    assert refused.status_code == 400, refused.text
    new = gateway.log.read_text(errors="replace")[before:]
    assert "Traceback" not in new and " ERROR " not in new, new
    assert "Exception on /analyze [POST]" in new  # still logged, as one INFO line


@pytest.mark.parametrize("fmt, mode", [("GIF", "L"), ("TIFF", "L"), ("BMP", "L"), ("EPS", "RGB"), ("WEBP", "L")])
def test_other_image_formats_are_415(gateway, fmt, mode):
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32), 120, np.uint8)).convert(mode).save(buf, format=fmt)
    refused = gateway.post("/analyze", files={"image": ("x", buf.getvalue(), "application/octet-stream")},
                           headers=AUTH)
    assert refused.status_code == 415, refused.text
    body = refused.json()
    assert body["error"] == "unsupported_media_type" and fmt in body["detail"] and "JPEG, PNG or DICOM" in body["detail"]


# -- slow and stalled uploads ---------------------------------------------------------------------------------------
SLOW = {"BRAINTUMOR_BODY_TIMEOUT_S": "3", "BRAINTUMOR_MAX_BODY_BYTES": "1000000",
        "BRAINTUMOR_MAX_BUFFERED_BYTES": "2500000", "BRAINTUMOR_EXPLAIN_TASK_TTL_S": "2"}
BODY_TIMEOUT_S = float(SLOW["BRAINTUMOR_BODY_TIMEOUT_S"])
# The 408 of the whole-body deadline (not of a stalled pause, serving's BODY_IDLE_S), naming its setting and value.
BODY_DEADLINE = b"did not arrive within 3 s (BRAINTUMOR_BODY_TIMEOUT_S)"


@pytest.fixture(scope="module")
def strict_gateway(tiny_triton, tmp_path_factory, running_gateway):
    with running_gateway(tmp_path_factory.mktemp("gateway_strict"), tiny_triton, **SLOW) as gw:
        yield gw


def _upload_start(url: str, declared: int, sent: bytes) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(b"POST /analyze HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % declared + sent)
    return sock


def _answer(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_a_stalled_upload_is_cut_off_and_its_connection_closed(strict_gateway):
    """The 408 names the deadline that fired and its configured value; the clock only shows it did not fire early
    (and the socket's 30 s timeout fails a server that never answers)."""
    start = time.monotonic()
    with _upload_start(strict_gateway.url, 900_000, b'{"image_base64": "' + b"A" * 1000) as sock:
        answer = _answer(sock)  # returns only when the server closes the connection
    took = time.monotonic() - start
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"request_timeout" in answer and BODY_DEADLINE in answer, answer
    assert BODY_TIMEOUT_S - 0.05 <= took < 10, took


def test_a_trickled_upload_is_cut_off_at_the_body_deadline(strict_gateway):
    """One byte a second, never idle long and never done: the whole-body deadline answers while it still trickles."""
    start = time.monotonic()
    with _upload_start(strict_gateway.url, 1000, b"{") as sock:
        while not select.select([sock], [], [], 1.0)[0]:  # until the server answers
            assert time.monotonic() - start < 4 * BODY_TIMEOUT_S, "no answer while the body trickled in"
            sock.sendall(b" ")
        answered = time.monotonic() - start
        answer = _answer(sock)
    assert answer.startswith(b"HTTP/1.1 408") and BODY_DEADLINE in answer, answer[:300]
    assert answered >= BODY_TIMEOUT_S - 0.05, answered


def test_uploads_held_at_once_are_capped(strict_gateway, slice_jpeg):
    stalled = [_upload_start(strict_gateway.url, 950_000, b'{"image_base64": "' + b"A" * 900_000) for _ in range(2)]
    try:
        # until the server has read both bodies (1.8 MB of the 2.5 MB budget); bounded by the event that ends the
        # window, their own 408 at the body deadline, not by a clock of ours
        while (refused := strict_gateway.post("/analyze", json={"image_base64": "A" * 900_000})).status_code != 429:
            assert not select.select(stalled, [], [], 0)[0], f"budget not full before the deadline: {refused.text}"
            time.sleep(0.05)
        assert refused.json()["error"] == "busy" and "BRAINTUMOR_MAX_BUFFERED_BYTES" in refused.json()["detail"]
        assert refused.headers["retry-after"] == "1"
        for sock in stalled:
            assert _answer(sock).startswith(b"HTTP/1.1 408")
    finally:
        for sock in stalled:
            sock.close()
    # the budget is given back when the stalled requests end
    assert strict_gateway.post("/analyze", json={"image_base64": _b64(slice_jpeg)}).status_code == 200


# -- explanation tasks: pixels only, gone once fetched or expired; no retry/cancel side effects -----------------------
def _stored_inputs(gateway) -> list[bytes]:
    import sqlite3

    with sqlite3.connect(gateway.log.parent / "task_result.db") as conn:
        return [bytes(row[0]) for row in conn.execute("SELECT input FROM result")]


def _task_ids(gateway) -> set[str]:
    """Ids of the stored tasks. Tests compare sets, not counts: an earlier test's fetched task is deleted just after
    its answer is sent, so a count can drop between two reads."""
    import sqlite3

    with sqlite3.connect(gateway.log.parent / "task_result.db") as conn:
        return {row[0] for row in conn.execute("SELECT task_id FROM result")}


def _wait_status(gateway, task_id: str, headers=None, until=("completed", "failed"), timeout=60) -> str:
    deadline = time.monotonic() + timeout
    while True:
        answer = gateway.get("/explain/status", params={"task_id": task_id}, headers=headers)
        status = answer.json().get("status") if answer.status_code == 200 else answer.status_code
        if status in until or time.monotonic() > deadline:
            return status
        time.sleep(0.2)


def test_a_task_stores_pixels_only_and_is_deleted_once_fetched(gateway, phi, phi_dicom):
    dicom = phi_dicom
    submitted = gateway.post("/explain/submit", files={"image": ("Doe^Jane_PID-98765.dcm", dicom, "application/dicom")},
                             data={"method": "gradcam"}, headers=AUTH)
    assert submitted.status_code == 200, submitted.text
    task_id = submitted.json()["task_id"]
    assert _wait_status(gateway, task_id, AUTH) == "completed"
    import json

    (row,) = [json.loads(r) for r in _stored_inputs(gateway) if b'"/explain/submit"' in r][-1:]
    headers = dict(row["scope"]["headers"])
    assert set(headers) <= {"host", "content-type", "content-length", "x-braintumor-caller"}
    assert headers["x-braintumor-caller"] == "env:BRAINTUMOR_API_KEY"  # who submitted it: a name, not the key
    body = json.loads(base64.b64decode(row["content"]))  # BentoML keeps the body base64-encoded
    assert set(body) == {"method", "image_base64"}
    image = base64.b64decode(body["image_base64"])
    assert image.startswith(b"\x89PNG") and b"DICM" not in image
    everything = json.dumps(row["scope"]).encode() + image + json.dumps(body).encode()
    for value in [*phi.values(), "Doe^Jane_PID-98765", "Doe", "PID-98765", KEY]:
        assert value.encode() not in everything, value
    result = gateway.get("/explain/get", params={"task_id": task_id}, headers=AUTH)
    assert result.status_code == 200 and result.json()["method"] == "gradcam"
    assert gateway.get("/explain/status", params={"task_id": task_id}, headers=AUTH).status_code == 404
    assert gateway.get("/explain/get", params={"task_id": task_id}, headers=AUTH).status_code == 404
    log = gateway.log.read_text(errors="replace")
    for value in [*phi.values(), "Doe^Jane", "PID-98765"]:
        assert value not in log, value


def test_retry_and_cancel_are_refused_without_side_effects(gateway, slice_jpeg):
    task_id = gateway.post("/explain/submit", json={"image_base64": _b64(slice_jpeg), "method": "gradcam"},
                           headers=AUTH).json()["task_id"]
    tasks_before = _task_ids(gateway)
    for method, path in (("PUT", "/explain/cancel"), ("POST", "/explain/retry"), ("GET", "/explain/cancel")):
        refused = httpx.request(method, gateway.url + path, params={"task_id": task_id}, headers=AUTH, timeout=30)
        assert refused.status_code == 405, refused.text
        assert refused.json()["error"] == "not_supported"
    assert _wait_status(gateway, task_id, AUTH) == "completed"  # not "canceled"
    assert not _task_ids(gateway) - tasks_before  # no second run stored
    assert gateway.get("/explain/get", params={"task_id": task_id}, headers=AUTH).status_code == 200


def test_a_bad_image_is_refused_at_submit_and_nothing_is_stored(gateway):
    tasks_before = _task_ids(gateway)
    refused = gateway.post("/explain/submit", files={"image": ("x.txt", b"not an image", "text/plain")},
                           data={"method": "gradcam"}, headers=AUTH)
    assert refused.status_code == 400 and refused.json()["error"] == "bad_input"
    assert not _task_ids(gateway) - tasks_before


def test_an_unfetched_task_is_deleted_after_its_ttl(strict_gateway, slice_jpeg):
    """Deleted once the TTL (2 s here) has passed, by the /explain requests that follow, and not before it (the store
    dates rows to the second and deletes those dated over TTL seconds before the current second: never early)."""
    submitted = time.monotonic()
    task_id = strict_gateway.post("/explain/submit", json={"image_base64": _b64(slice_jpeg),
                                                           "method": "gradcam"}).json()["task_id"]
    assert _wait_status(strict_gateway, task_id) == "completed"
    assert not [r for r in _stored_inputs(strict_gateway) if b"x-braintumor-caller" in r]  # no keys: no caller
    assert _wait_status(strict_gateway, task_id, until=(404,), timeout=30) == 404  # each status call may purge
    ttl = float(SLOW["BRAINTUMOR_EXPLAIN_TASK_TTL_S"])
    assert time.monotonic() - submitted >= ttl


def test_every_stalled_upload_is_closed_by_its_deadline(strict_gateway):
    """Issue 25: 20 uploads that send part of their body and stall. The worker's buffer budget holds two of them
    (they get 408 at the body deadline); the rest are refused at once (429) before their bodies are read, and each of
    those connections must be closed too, not kept open reading a body nobody will use from a stalled client."""
    declared, sent = 950_000, b'{"image_base64": "' + b"A" * 700_000
    stalled = [_upload_start(strict_gateway.url, declared, sent) for _ in range(20)]
    answers = []
    try:
        deadline = time.monotonic() + BODY_TIMEOUT_S + 15  # the body deadline + slack
        for sock in stalled:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                answers.append(_answer(sock))  # returns when the server closed it; a timeout fails the test
            except ConnectionResetError:
                # closed with part of the body still unread: the kernel resets, and the answer may be lost with it
                answers.append(b"reset")
    finally:
        for sock in stalled:
            sock.close()
    statuses = sorted(answer[9:12].decode() if answer != b"reset" else "reset" for answer in answers)
    assert set(statuses) <= {"408", "429", "reset"} and "408" in statuses, statuses
    assert all(b"connection: close" in answer.lower() for answer in answers if answer != b"reset")


# -- several callers: a task is its caller's only ------------------------------------------------------------------
ALICE, BOB = "alice-key-0123456789abcdef", "bob-key-0123456789abcdef"


@pytest.fixture(scope="module")
def callers_gateway(tiny_triton, tmp_path_factory, running_gateway):
    home = tmp_path_factory.mktemp("gateway_callers")
    keys = home / "api-keys"
    keys.write_text(f"# name:key\nalice:{ALICE}\nbob:{BOB}\n")
    with running_gateway(home, tiny_triton, BRAINTUMOR_API_KEY=KEY, BRAINTUMOR_API_KEYS_FILE=str(keys)) as gw:
        yield gw


def _task_answer(gateway, path: str, headers: dict, params, method: str = "GET"):
    answer = httpx.request(method, gateway.url + path, params=params, headers=headers, timeout=30)
    return answer.status_code, answer.content, sorted((k, v) for k, v in answer.headers.items() if k != "date")


def test_a_task_is_visible_only_to_the_key_that_submitted_it(callers_gateway, slice_jpeg):
    import json
    import uuid

    gw = callers_gateway
    alice, bob, env = {"x-api-key": ALICE}, {"authorization": f"Bearer {BOB}"}, AUTH
    task_id = gw.post("/explain/submit", json={"image_base64": _b64(slice_jpeg), "method": "gradcam"},
                      headers=alice).json()["task_id"]
    assert _wait_status(gw, task_id, alice) == "completed"
    import sqlite3

    with sqlite3.connect(gw.log.parent / "task_result.db") as conn:
        (stored,) = conn.execute("SELECT input FROM result WHERE task_id = ?", (task_id,)).fetchone()
    assert dict(json.loads(stored)["scope"]["headers"])["x-braintumor-caller"] == "name:alice"
    unknown = uuid.uuid4().hex
    for other in (bob, env):  # another file key, and BRAINTUMOR_API_KEY: both are other callers
        for method, path in (("GET", "/explain/status"), ("GET", "/explain/get"), ("HEAD", "/explain/status"),
                             ("POST", "/explain/retry"), ("PUT", "/explain/cancel")):
            theirs = _task_answer(gw, path, other, {"task_id": task_id}, method)
            assert theirs == _task_answer(gw, path, other, {"task_id": unknown}, method), (path, method)
            assert theirs[0] == (405 if path in ("/explain/retry", "/explain/cancel") else 404)
        # a second task_id cannot carry alice's id past the check (BentoML reads the last one)
        own = gw.post("/explain/submit", json={"image_base64": _b64(slice_jpeg), "method": "gradcam"},
                      headers=other).json()["task_id"]
        for params in ([("task_id", own), ("task_id", task_id)], [("task_id", task_id), ("task_id", own)]):
            for path in ("/explain/status", "/explain/get"):
                smuggled = httpx.get(gw.url + path, params=params, headers=other, timeout=30)
                assert smuggled.status_code == 400 and smuggled.json()["error"] == "bad_input", smuggled.text
        assert _wait_status(gw, own, other) == "completed"  # their own task answers them
        assert gw.get("/explain/get", params={"task_id": own}, headers=other).status_code == 200
    assert task_id in _task_ids(gw)  # nothing of alice's touched
    assert _wait_status(gw, task_id, alice) == "completed"  # not cancelled, still there for alice
    result = gw.get("/explain/get", params={"task_id": task_id}, headers=alice)
    assert result.status_code == 200 and result.json()["method"] == "gradcam"
    assert gw.get("/explain/get", params={"task_id": task_id}, headers=alice).status_code == 404  # fetched: gone
    # no key in the log, the task store or the metrics
    stored = b"".join(_stored_inputs(gw))
    for text in (gw.log.read_bytes(), stored, gw.get("/metrics").content):
        for key in (ALICE, BOB, KEY):
            assert key.encode() not in text and base64.b64encode(key.encode()) not in text
