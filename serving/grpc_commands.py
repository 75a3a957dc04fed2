"""CLI subcommand `braintumor grpc-server`: the gRPC API (braintumor.v1, health, reflection) over a running Triton."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from dataclasses import replace

from ..export.contract import LAYOUTS
from .settings import BACKENDS

API_KEY_ENV = "BRAINTUMOR_API_KEY"


def _grpc_server(args: argparse.Namespace) -> int:
    from .grpc_server import serve_grpc
    from . import logsafe
    from .settings import ServeSettings, exposure_warning

    settings = ServeSettings.from_env()
    overrides = {}
    # Each is absent unless given: the environment's value or the default stays.
    for name in ("triton_url", "model_name", "backend", "model_repository", "layout"):
        if getattr(args, name, None):
            overrides[name] = getattr(args, name)
    if args.api_key_env != API_KEY_ENV and args.api_key_env not in os.environ:
        raise ValueError(f"--api-key-env {args.api_key_env}: that environment variable is not set")
    overrides["api_key"] = os.environ.get(args.api_key_env, "")
    settings = replace(settings, **overrides)
    settings.check()  # the flags may have made an unusable combination (onnxruntime without a repository)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logsafe.install()
    exposed = exposure_warning(args.host, settings.authenticates)
    if exposed:  # a warning, not a refusal: in a cluster a NetworkPolicy or a mesh may be what authenticates
        logging.getLogger("braintumor.grpc").warning("%s", exposed)
    metrics_port = args.metrics_port if args.metrics_port > 0 else None
    asyncio.run(serve_grpc(settings, args.port, host=args.host, metrics_port=metrics_port, grace=args.grace))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "grpc-server", help="serve the gRPC API (braintumor.v1.BrainTumor, health, reflection) over a running Triton",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Serve braintumor.v1.BrainTumor (Analyze, AnalyzeStream, Explain, GetModelInfo; the proto is in "
                    "clients/proto) with the standard gRPC health service (SERVING while Triton has the model "
                    "loaded) and server reflection, plus Prometheus metrics over HTTP. Other limits (message size, "
                    "stream window, explanation budgets) come from the BRAINTUMOR_* environment variables. "
                    "SIGTERM or Ctrl-C stop it gracefully.")
    p.add_argument("--port", type=int, default=50051, help="port of the gRPC API")
    p.add_argument("--host", default="127.0.0.1",
                   help="address the gRPC API and the metrics endpoint bind to (0.0.0.0: every interface; without "
                        "an API key that logs a warning)")
    p.add_argument("--metrics-port", type=int, default=50052,
                   help="port of the Prometheus /metrics endpoint (braintumor_* metrics, frontend=\"grpc\"); 0: none")
    p.add_argument("--triton-url", default=argparse.SUPPRESS,
                   help="Triton's gRPC endpoint HOST:PORT (default: $BRAINTUMOR_TRITON_URL, else 127.0.0.1:8001)")
    p.add_argument("--backend", choices=BACKENDS, default=argparse.SUPPRESS,
                   help="who runs the model: triton (at --triton-url) or onnxruntime (in this process, from "
                        "--model-repository; default: $BRAINTUMOR_BACKEND, else triton)")
    p.add_argument("--model-repository", default=argparse.SUPPRESS,
                   help="the repository written by `braintumor export`, for --backend onnxruntime (default: "
                        "$BRAINTUMOR_MODEL_REPOSITORY)")
    p.add_argument("--layout", choices=LAYOUTS, default=argparse.SUPPRESS,
                   help="which model config --backend onnxruntime reads (default: $BRAINTUMOR_LAYOUT, else latency)")
    p.add_argument("--model-name", default=argparse.SUPPRESS,
                   help="name of the model in Triton's repository (default: $BRAINTUMOR_MODEL_NAME, else brain_tumor)")
    p.add_argument("--api-key-env", default=API_KEY_ENV, metavar="VAR",
                   help="environment variable holding the API key callers must send as metadata `x-api-key` or "
                        "`authorization: Bearer` (the key never goes on the command line); unset or empty: no "
                        "authentication. Health and reflection stay open")
    p.add_argument("--grace", type=float, default=10.0,
                   help="seconds calls in flight get to finish after SIGTERM/Ctrl-C before they are cancelled")
    p.set_defaults(func=_grpc_server)
