"""The deploy's nginx front (serving/deploy/nginx/braintumor.conf) in front of a real gateway: it closes connections
whose request head is incomplete (the gateway's uvicorn has no such timeout, issue 13 finding 5) and bodies that
stall, which never reach the gateway. Needs an nginx binary: on PATH or in NGINX_BIN."""

import select
import socket
import time

import pytest

from braintumor.loadtest.bench_nginx import DEPLOY_CONF as CONF
from braintumor.loadtest.bench_nginx import deploy_server, nginx_binary, start, wait_proxied, write_config
from braintumor.serving.supervisor import stop_group

httpx = pytest.importorskip("httpx")
pytest.importorskip("bentoml")

pytestmark = pytest.mark.integration

HEADER_TIMEOUT_S, BODY_TIMEOUT_S = 10, 15  # what CONF says (checked below)


def _nginx() -> str:
    found = nginx_binary()
    if not found:
        pytest.skip("nginx is not installed (apt-get install nginx, or set NGINX_BIN)")
    return found


@pytest.fixture(scope="module")
def proxied(tmp_path_factory, running_gateway):
    """(proxy url, gateway): nginx running CONF, its upstream pointed at a gateway without Triton."""
    from braintumor.serving.triton_embedded import free_port

    nginx = _nginx()
    root = tmp_path_factory.mktemp("proxy")
    with running_gateway(root / "gateway", "127.0.0.1:9", ready=False, BRAINTUMOR_API_KEY="k") as gateway:
        text = CONF.read_text()
        assert f"client_header_timeout {HEADER_TIMEOUT_S}s;" in text and f"client_body_timeout {BODY_TIMEOUT_S}s;" in text
        port = free_port()
        proc = start(nginx, write_config(root, deploy_server(gateway.url.removeprefix("http://"), port)))
        url = f"http://127.0.0.1:{port}"
        try:
            try:
                wait_proxied(proc, url, root)
            except RuntimeError as exc:
                pytest.fail(str(exc))
            yield url, gateway
        finally:
            stop_group(proc, 15, "nginx")


def test_the_proxy_passes_requests_and_the_key_check(proxied):
    url, gateway = proxied
    assert httpx.get(url + "/healthz", timeout=10).status_code == 200
    before = _analyze_requests(gateway)
    refused = httpx.post(url + "/analyze", json={"image_base64": "x"}, timeout=10)
    assert refused.status_code == 401 and refused.json()["error"] == "unauthenticated"  # the gateway's answer
    assert _analyze_requests(gateway) == before + 1


def _analyze_requests(gateway) -> float:
    """/analyze requests the gateway has answered (its own request counter, read directly, not through nginx)."""
    lines = httpx.get(gateway.url + "/metrics", timeout=10).text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines
               if line.startswith("braintumor_requests_total{") and 'endpoint="analyze"' in line)


def test_slow_request_heads_and_stalled_bodies_are_closed(proxied):
    """20 heads trickled a byte a second and a silent connection are closed at the header timeout, a stalled body at
    the body timeout, each timed from its own last start (the close is seen when it happens: select, not a 1 s poll);
    the timeouts are nginx's (its default is 60 s), so the upper bounds only allow for a busy host."""
    url, gateway = proxied
    host, port = url.removeprefix("http://").split(":")
    analyze_before = _analyze_requests(gateway)
    started, everyone = [], []
    for _ in range(20):
        started.append(time.monotonic())  # nginx's header timer runs from the accept
        everyone.append(socket.create_connection((host, int(port)), timeout=5))
        everyone[-1].sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: ")
    trickling = list(everyone)
    started.append(time.monotonic())
    everyone.append(socket.create_connection((host, int(port)), timeout=5))  # connects, never sends a byte
    stalled = socket.create_connection((host, int(port)), timeout=5)
    stalled.sendall(b"POST /analyze HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 100000\r\n\r\n" + b"{" * 1000)
    started.append(time.monotonic())  # the body timer runs from its last read
    everyone.append(stalled)
    closed: dict[int, float] = {}
    open_ = dict(enumerate(everyone))
    deadline = time.monotonic() + BODY_TIMEOUT_S + 10
    next_byte = time.monotonic() + 1.0
    while open_ and time.monotonic() < deadline:
        wait = max(0.0, min(next_byte, deadline) - time.monotonic())
        readable, _, _ = select.select(list(open_.values()), [], [], wait)
        for sock in readable:
            i = everyone.index(sock)
            try:
                data = sock.recv(4096)
            except OSError:
                data = b""
            if data == b"":  # closed by nginx (an answer, if any, came before; keep reading to the end)
                closed[i] = time.monotonic() - started[i]
                del open_[i]
        if time.monotonic() >= next_byte:
            for i, sock in list(open_.items()):
                if sock in trickling:
                    try:
                        sock.sendall(b"a")  # one byte a second: never a complete head
                    except OSError:
                        closed[i] = time.monotonic() - started[i]
                        del open_[i]
            next_byte += 1.0
    for sock in everyone:
        sock.close()
    heads = [closed.get(i) for i in range(len(trickling) + 1)]
    print(f"closed after (s): heads {heads}, stalled body {closed.get(len(everyone) - 1)}")
    assert all(t is not None and HEADER_TIMEOUT_S - 0.5 <= t <= HEADER_TIMEOUT_S + 4 for t in heads), heads
    assert BODY_TIMEOUT_S - 0.5 <= closed.get(len(everyone) - 1, 1e9) <= BODY_TIMEOUT_S + 4, closed
    assert _analyze_requests(gateway) == analyze_before  # the stalled body never reached the gateway
