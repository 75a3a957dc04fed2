"""nginx in front of `braintumor serve` for bench_gateway.py ``--nginx`` (and the proxy tests): the deploy's own HTTP
front (serving/deploy/nginx/braintumor.conf, its upstream pointed at the gateway) and, beside it, nginx terminating
the client's HTTP/2 and streaming each call to the gRPC door (``grpc_pass``), the two fronts the request-path issue
asked to measure against the Python doors alone.

nginx cannot turn a REST /analyze into a gRPC call by itself (that takes a transcoder, e.g. Envoy's gRPC-JSON
filter); what it can put in front of the gRPC door is gRPC, so that is what the gRPC line sends through it."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

DEPLOY_CONF = Path(__file__).resolve().parents[1] / "serving" / "deploy" / "nginx" / "braintumor.conf"
_UPSTREAM, _LISTEN = "server gateway:3000;", "listen 8080;"
_TEMP_KINDS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")

GRPC_SERVER = """
server {{
    listen 127.0.0.1:{port} http2;
    server_tokens off;
    client_max_body_size 20m;
    location / {{
        grpc_pass grpc://{upstream};
        grpc_read_timeout 300s;
    }}
}}
"""


def nginx_binary() -> str | None:
    """NGINX_BIN, else nginx on PATH or in /usr/sbin."""
    return os.environ.get("NGINX_BIN") or shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")


def deploy_server(gateway: str, port: int) -> str:
    """The deploy's server block with its upstream at ``gateway`` (HOST:PORT) and listening on 127.0.0.1:``port``."""
    text = DEPLOY_CONF.read_text()
    for old in (_UPSTREAM, _LISTEN):
        if text.count(old) != 1:
            raise ValueError(f"{DEPLOY_CONF} no longer has exactly one {old!r}; update {__name__}")
    return text.replace(_UPSTREAM, f"server {gateway};").replace(_LISTEN, f"listen 127.0.0.1:{port};")


def write_config(root: Path, servers: str, workers: int = 1) -> Path:
    """nginx.conf under ``root`` (pid, logs and temp files there too) running ``servers`` in its http {} block."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "servers.conf").write_text(servers)
    temp = " ".join(f"{kind}_temp_path {root / kind};" for kind in _TEMP_KINDS)
    conf = root / "nginx.conf"
    conf.write_text(("user root root;\n" if os.geteuid() == 0 else "")
                    + f"daemon off;\nworker_processes {workers};\npid {root / 'nginx.pid'};\n"
                    f"error_log {root / 'error.log'} info;\nevents {{ worker_connections 256; }}\n"
                    f"http {{ access_log off; {temp} include {root / 'servers.conf'}; }}\n")
    return conf


def start(nginx: str, conf: Path) -> subprocess.Popen:
    return subprocess.Popen([nginx, "-p", str(conf.parent), "-c", str(conf)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


@dataclass
class NginxFront:
    """A running nginx: its process, the HTTP URL in front of the gateway and the gRPC target in front of the door."""

    proc: subprocess.Popen
    http_url: str
    grpc_target: str | None


def front_doors(root: Path, gateway_url: str, grpc_target: str | None, workers: int = 1,
                timeout: float = 20.0) -> NginxFront:
    """Start nginx with the deploy's HTTP front before ``gateway_url`` and a gRPC front before ``grpc_target``; wait
    until /healthz answers through it."""
    from braintumor.serving.triton_embedded import free_port

    nginx = nginx_binary()
    if not nginx:
        raise SystemExit("--nginx: no nginx binary (apt-get install nginx, or set NGINX_BIN)")
    http_port = free_port()
    servers = deploy_server(gateway_url.split("://", 1)[-1].rstrip("/"), http_port)
    grpc_port = None
    if grpc_target:
        grpc_port = free_port()
        servers += GRPC_SERVER.format(port=grpc_port, upstream=grpc_target)
    proc = start(nginx, write_config(root, servers, workers))
    url = f"http://127.0.0.1:{http_port}"
    try:
        wait_proxied(proc, url, root, timeout)
    except RuntimeError as exc:
        proc.kill()
        raise SystemExit(str(exc)) from None
    return NginxFront(proc, url, f"127.0.0.1:{grpc_port}" if grpc_port else None)


def wait_proxied(proc: subprocess.Popen, url: str, root: Path, timeout: float = 20.0) -> None:
    """Until ``url``/healthz answers 200 through nginx; RuntimeError with nginx's error log if it exits or times out."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("nginx did not proxy /healthz:\n" + (root / "error.log").read_text(errors="replace"))
        time.sleep(0.2)
