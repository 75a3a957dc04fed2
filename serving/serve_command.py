"""CLI subcommand `braintumor serve`: Triton + the BentoML HTTP gateway + the gRPC API, up together, down together.

Starts the embedded Triton on the bundled model (or uses ``--triton-url``), then the gateway (``bentoml serve``)
and the gRPC server as child processes sharing the ``BRAINTUMOR_*`` settings, waits until all three are ready,
prints the URLs, restarts whichever of them dies (with backoff; the others stay up), and on Ctrl-C / SIGTERM stops
every one of them.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from ..export.contract import LAYOUTS
from .settings import BACKENDS
from .triton_commands import default_model_repository

GATEWAY_TARGET = "braintumor.serving.service:BrainTumorGateway"
# Triton has no authentication: the embedded one listens on loopback only, whatever --host the front doors get.
TRITON_ADDRESS = "127.0.0.1"


def _serve(args: argparse.Namespace) -> int:
    from . import logsafe
    from .settings import ServeSettings, exposure_warning
    from .supervisor import ChildProcess, become_subreaper, grpc_serving, http_ready, stop_orphans, wait_until
    from .local_model import LocalModel
    from .triton_embedded import EmbeddedTriton, TritonServerError, check_ports

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logsafe.install()
    log = logging.getLogger("braintumor.serve")
    settings = ServeSettings.from_env()
    exposed = exposure_warning(args.host, settings.authenticates)
    if exposed and not args.allow_unauthenticated:
        print(f"braintumor serve: error: --host {args.host} without an API key would let anyone on the network use "
              "the service; set BRAINTUMOR_API_KEY or BRAINTUMOR_API_KEYS_FILE, bind to 127.0.0.1 (the default), or "
              "pass --allow-unauthenticated if something in front authenticates", file=sys.stderr)
        return 2
    if exposed:
        for line in ("!" * 100, exposed, "!" * 100):  # one record a line: log records are one line each
            log.warning("%s", line)
    own_ports = {"gateway HTTP": args.http_port, "gRPC API": args.grpc_port, "gRPC metrics": args.grpc_metrics_port}
    check_ports(own_ports, args.host, options={"gateway HTTP": "--http-port", "gRPC API": "--grpc-port",
                                               "gRPC metrics": "--grpc-metrics-port"})

    subreaper = sys.platform.startswith("linux") and become_subreaper()
    stop_signals: list[int] = []
    triton = None
    children: list[ChildProcess] = []
    # BentoML keeps task results (LIME/SHAP via /explain/submit) in a store; one per run, removed at the end,
    # so two `serve` instances never share results and nothing of a patient's request outlives the run.
    result_store = tempfile.mkdtemp(prefix="braintumor-tasks-")

    def on_signal(signum: int, _frame: object) -> None:
        stop_signals.append(signum)
        if triton is not None:
            triton.abort_start()  # stop waiting for Triton's readiness

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    client_host = "127.0.0.1" if args.host in ("0.0.0.0", "") else args.host
    try:
        if args.backend == "onnxruntime":
            if args.triton_url:
                raise ValueError("--triton-url names a Triton to call; --backend onnxruntime runs the model in the "
                                 "front doors instead: pass one of them")
            if args.model_repository is None:
                raise ValueError("no model repository: pass --model-repository DIR")
            version = LocalModel.check(args.model_repository, settings.model_name, settings.model_version,
                                       args.layout)
            settings = replace(settings, backend="onnxruntime", model_repository=str(args.model_repository.resolve()),
                               layout=args.layout)
            log.info("no Triton: the HTTP gateway and the gRPC API each run %s v%s in-process with ONNX Runtime "
                     "(%s layout)", settings.model_name, version, args.layout)
        elif args.triton_url:
            if args.layout != "latency":
                raise ValueError("--layout chooses the embedded Triton's model configs; start your own Triton with "
                                 f"--model-config-name={args.layout} instead")
            settings = replace(settings, triton_url=args.triton_url)
            log.info("using the external Triton at %s (no embedded Triton started)", args.triton_url)
        else:
            if args.model_repository is None:
                raise ValueError("no model repository: pass --model-repository DIR or --triton-url HOST:PORT")
            triton = EmbeddedTriton(args.model_repository, args.triton_http_port, args.triton_grpc_port,
                                    args.triton_metrics_port, address=TRITON_ADDRESS,
                                    startup_timeout=args.startup_timeout, layout=args.layout,
                                    echo=sys.stderr if args.verbose else None, option_prefix="triton-",
                                    client_key=settings.triton_client_key() or None)
            triton.start()
            # the front doors get the key Triton's inference and model config need through their environment
            settings = replace(settings, triton_url=triton.grpc_url, triton_key=triton.client_key or "",
                               triton_key_file="")
        env = {**os.environ, **settings.to_env(), "BRAINTUMOR_HTTP_WORKERS": str(args.workers),
               "BENTOML_RESULT_STORE": os.path.join(result_store, "task_result.db")}

        children.append(ChildProcess("HTTP gateway", [
            sys.executable, "-m", "bentoml", "serve", GATEWAY_TARGET, "--host", args.host,
            "--port", str(args.http_port)], env).start())
        children.append(ChildProcess("gRPC API", [
            sys.executable, "-m", "braintumor.serving.cli", "grpc-server", "--host", args.host,
            "--port", str(args.grpc_port), "--metrics-port", str(args.grpc_metrics_port)], env).start())

        gateway = f"http://{client_host}:{args.http_port}"
        grpc_target = f"{client_host}:{args.grpc_port}"
        abort = lambda: bool(stop_signals)  # noqa: E731
        wait_until(lambda: http_ready(f"{gateway}/readyz"), args.startup_timeout, children, "the HTTP gateway",
                   abort=abort)
        wait_until(lambda: grpc_serving(grpc_target), args.startup_timeout, children, "the gRPC API", abort=abort)

        lines = [
            "braintumor is ready",
            f"  HTTP gateway   {gateway}  (POST /analyze, /analyze_batch, /explain; docs at /, /metrics)",
            f"  gRPC API       {grpc_target}  (braintumor.v1.BrainTumor; health + reflection; "
            f"metrics http://{client_host}:{args.grpc_metrics_port}/metrics)",
        ]
        if triton is not None:
            lines.append(f"  Triton         http://{triton.http_url}  gRPC {triton.grpc_url}  "
                         f"metrics {triton.metrics_url}")
        elif settings.backend == "onnxruntime":
            lines.append(f"  model          in-process ONNX Runtime in each front door ({args.model_repository})")
        else:
            lines.append(f"  Triton         {settings.triton_url} (external)")
        lines.append("Ctrl-C stops everything.")
        print("\n".join(lines), flush=True)

        _supervise(triton, children, stop_signals, log, subreaper=subreaper)
        log.info("%s received; stopping", signal.Signals(stop_signals[0]).name)
        return 0
    except KeyboardInterrupt:
        return 130
    except (RuntimeError, TritonServerError) as exc:
        print(f"braintumor serve: error: {exc}", file=sys.stderr)
        return 1
    finally:
        # The front doors first, both at once (each drains its own calls; a stop was the sum of theirs), then the
        # model server they call.
        with ThreadPoolExecutor(max(1, len(children)), thread_name_prefix="stop") as pool:
            for child, code in zip(children, pool.map(lambda c: c.stop(), children)):
                log.info("%s stopped (exit code %s)", child.name, code)
        if triton is not None:
            triton.stop()
        if subreaper:
            stop_orphans(keep=())
        shutil.rmtree(result_store, ignore_errors=True)
        for s, handler in previous.items():
            signal.signal(s, handler)


def _supervise(triton, children: list, stop_signals: list[int], log: logging.Logger, interval: float = 0.5,
               subreaper: bool = False) -> None:
    """Until a stop signal: restart whatever dies (Triton, the gateway, the gRPC API), each after its own backoff.

    While Triton is down the front doors stay up, answer 503 / UNAVAILABLE (HTTP with Retry-After) and report
    not ready; they reconnect by themselves when it is back. A dead child's process group is stopped first, and
    (``subreaper``: this process adopts orphans) every orphan it left, so nothing (BentoML workers, which run in
    their own sessions; python stubs) holds its port.
    """
    from .supervisor import Backoff, stop_orphans
    from .triton_embedded import TritonServerError

    parts: dict[str, tuple] = {}  # name -> (alive, stop -> exit code, start)
    if triton is not None:
        parts["Triton"] = (triton.is_running, lambda: triton.stop(timeout=10), triton.start)
    for child in children:
        parts[child.name] = (child.alive, lambda c=child: c.stop(timeout=10), child.start)
    backoff = {name: Backoff() for name in parts}
    due: dict[str, float] = {}  # name -> when to restart it
    now = time.monotonic()
    for b in backoff.values():
        b.started(now)
    while not stop_signals:
        for name, (alive, stop, start) in parts.items():
            now = time.monotonic()
            if name not in due:
                if alive():
                    continue
                code = stop()
                if subreaper:
                    stop_orphans(keep=_tracked_pids(triton, children))
                due[name] = now + backoff[name].failed(now)
                log.error("%s exited (code %s); restarting it in %.0f s", name, code, due[name] - now)
                if name == "Triton":
                    log.error("the front doors answer 503 / UNAVAILABLE until Triton is back; its last log lines:")
                    for line in triton.log_tail(15).splitlines():
                        log.error("  tritonserver: %s", line)
            elif now >= due[name] and not stop_signals:
                try:
                    start()
                except (TritonServerError, OSError, ValueError) as exc:
                    due[name] = time.monotonic() + backoff[name].failed(time.monotonic())
                    log.error("restarting %s failed (%s); next try in %.0f s", name, exc, due[name] - time.monotonic())
                    continue
                backoff[name].started(time.monotonic())
                del due[name]
                log.info("%s restarted", name)
        time.sleep(interval)


def _tracked_pids(triton, children: list) -> set[int]:
    pids = {child.pid for child in children} | ({triton.pid} if triton is not None else set())
    return {pid for pid in pids if pid is not None}


def register(sub: argparse._SubParsersAction) -> None:
    default_repo = default_model_repository()
    p = sub.add_parser(
        "serve", help="start Triton, the HTTP gateway and the gRPC API on the bundled model",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Start the embedded Triton on the model repository (or use --triton-url), the BentoML HTTP "
                    "gateway and the gRPC API; wait until all are ready and print their URLs; Ctrl-C or SIGTERM "
                    "stops all of them. Settings such as BRAINTUMOR_API_KEY (turns authentication on) are read "
                    "from the environment; see the README.")
    p.add_argument("--http-port", type=int, default=3000, help="port of the HTTP gateway (BentoML)")
    p.add_argument("--grpc-port", type=int, default=50051, help="port of the gRPC API (braintumor.v1)")
    p.add_argument("--grpc-metrics-port", type=int, default=50052, help="port of the gRPC server's Prometheus /metrics")
    p.add_argument("--triton-http-port", type=int, default=8000, help="embedded Triton's HTTP port")
    p.add_argument("--triton-grpc-port", type=int, default=8001, help="embedded Triton's gRPC port")
    p.add_argument("--triton-metrics-port", type=int, default=8002, help="embedded Triton's Prometheus metrics port")
    p.add_argument("--model-repository", type=Path, default=default_repo,
                   help="Triton model repository for the embedded Triton (default: the bundled release model)")
    p.add_argument("--triton-url", default=None,
                   help="HOST:PORT of an already running Triton's gRPC endpoint; then no Triton is started")
    p.add_argument("--workers", type=int, default=1, help="HTTP gateway worker processes")
    p.add_argument("--host", default="127.0.0.1",
                   help="address the HTTP gateway and the gRPC API bind to (0.0.0.0: every interface, which needs "
                        "BRAINTUMOR_API_KEY or --allow-unauthenticated); the embedded Triton always binds 127.0.0.1")
    p.add_argument("--allow-unauthenticated", action="store_true",
                   help="start on a non-loopback --host without BRAINTUMOR_API_KEY (with a loud warning); only when "
                        "something in front of the service authenticates callers")
    p.add_argument("--backend", choices=BACKENDS, default="triton",
                   help="who runs the model: triton (the embedded Triton, or --triton-url; the production path) or "
                        "onnxruntime (no Triton: each front door loads --model-repository's ONNX graphs with ONNX "
                        "Runtime in its own process; for single-host installs, README has the measurements)")
    p.add_argument("--layout", choices=LAYOUTS, default="latency",
                   help="the model layout (the embedded Triton's, or the onnxruntime backend's): latency (one model "
                        "instance using every core: the fastest single request) or throughput (an instance per share "
                        "of the cores: more images per second under concurrent load, a slower single request; README "
                        "has the measurements)")
    p.add_argument("--startup-timeout", type=float, default=180.0, help="seconds to wait for each part to be ready")
    p.add_argument("--verbose", action="store_true", help="echo Triton's log")
    p.set_defaults(func=_serve)
