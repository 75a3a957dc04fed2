"""Checks made before the embedded Triton starts, each failing with the option to change: ports free and distinct,
a repository that holds a model, the layout's configs present; and a free port for tests and benchmarks."""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path
from typing import Mapping

from ..export.contract import CONFIG_FILE, CONFIGS_DIR, LAYOUTS


def check_ports(ports: Mapping[str, int], host: str = "0.0.0.0", options: Mapping[str, str] | None = None) -> None:
    """Fail early, naming the option to change, when a port is taken or two services share one. ``options``: each
    name's command-line option (default ``--<name>-port``)."""
    flag = {name: (options or {}).get(name, f"--{name}-port") for name in ports}
    seen: dict[int, str] = {}
    for name, port in ports.items():
        if not 1 <= int(port) <= 65535:
            raise ValueError(f"{flag[name]} {port} is not a TCP port (1-65535)")
        if port in seen:
            raise ValueError(f"{flag[name]} and {flag[seen[port]]} are both {port}; give each service its own port")
        seen[port] = name
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as exc:
                raise ValueError(f"{name} port {port} is already in use ({exc.strerror}); stop what holds it or "
                                 f"choose another with {flag[name]}") from None


# The draw has its own generator: code that seeds the global one (training does) must not make every process on the
# host draw the same ports (two test sessions collided on the same "random" port after training).
_PORTS = random.SystemRandom()


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now, for tests and benchmarks, drawn BELOW the kernel's ephemeral range when it can be.

    Binding to port 0 returns an ephemeral port, the same pool every outgoing connection takes its local port
    from: between this call and the server binding it, a client connection elsewhere on the host can take it
    (seen as "Address already in use" in the e2e suite). Ports under the range are never handed out that way.
    """
    low = _ephemeral_low()
    for port in _PORTS.sample(range(20000, low), min(64, max(0, low - 20000))):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _ephemeral_low(default: int = 32768) -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return default


def check_repository(path: str | os.PathLike) -> Path:
    """The repository must exist and hold at least one ``<model>/config.pbtxt`` (the python backend needs one)."""
    repo = Path(path).expanduser().resolve()
    if not repo.exists():
        raise FileNotFoundError(f"model repository {repo} does not exist; create it with "
                                "`braintumor export --checkpoint CKPT --out DIR`")
    if not repo.is_dir():
        raise NotADirectoryError(f"model repository {repo} is not a directory")
    models = sorted(p.parent.name for p in repo.glob(f"*/{CONFIG_FILE}"))
    if not models:
        raise ValueError(f"model repository {repo} holds no model (expected {repo}/<model>/{CONFIG_FILE}); "
                         "create one with `braintumor export`")
    return repo


def check_layout(repo: Path, layout: str) -> None:
    """Every model of ``repo`` has the layout's config (Triton would quietly fall back to config.pbtxt otherwise)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    if layout == "latency":
        return
    missing = sorted(p.parent.name for p in repo.glob(f"*/{CONFIG_FILE}")
                     if not (p.parent / CONFIGS_DIR / f"{layout}.pbtxt").is_file())
    if missing:
        raise ValueError(f"models {missing} in {repo} have no {CONFIGS_DIR}/{layout}.pbtxt (exported before layouts); "
                         "re-export them with `braintumor export`, or serve the latency layout")
