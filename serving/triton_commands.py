"""CLI subcommand `braintumor triton`: serve a model repository with the embedded tritonserver until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from ..export.contract import LAYOUTS

# The repository's own model_repository/ (a source checkout or an editable install); absent in a wheel install.
_SOURCE_REPOSITORY = Path(__file__).resolve().parent.parent / "model_repository"


def default_model_repository() -> Path | None:
    """``model_repository/`` next to the package source when it holds a model, else None (the option is required)."""
    repo = _SOURCE_REPOSITORY
    return repo if repo.is_dir() and any(repo.glob("*/config.pbtxt")) else None


def _triton(args: argparse.Namespace) -> int:
    from .triton_embedded import EmbeddedTriton, TritonServerError

    if args.model_repository is None:
        raise ValueError("no model repository: pass --model-repository DIR (create one with `braintumor export`)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    key = _client_key(args)
    triton = EmbeddedTriton(args.model_repository, args.http_port, args.grpc_port, args.metrics_port,
                            address=args.address, log_verbose=args.log_verbose,
                            startup_timeout=args.startup_timeout, layout=args.layout,
                            echo=None if args.quiet else sys.stderr, client_key=key)
    try:
        return triton.serve_forever()
    except TritonServerError as exc:
        print(f"braintumor triton: error: {exc}", file=sys.stderr)
        return 1


def _client_key(args: argparse.Namespace) -> str:
    """The key Triton's inference, model config and metadata will need: BRAINTUMOR_TRITON_KEY or the file
    BRAINTUMOR_TRITON_KEY_FILE names (what the front doors read too); else a new random one written to --key-file
    (mode 0600) for the front doors to read."""
    import secrets

    from .settings import ServeSettings

    given = ServeSettings.from_env().triton_client_key()
    if given:
        return given
    key = secrets.token_urlsafe(32)
    path = args.key_file
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(key + "\n")
    os.chmod(path, 0o600)  # an existing file keeps its mode through O_CREAT
    logging.getLogger(__name__).info("Triton's inference API needs a key; start the front doors with "
                                     "BRAINTUMOR_TRITON_KEY_FILE=%s", path)
    return key


def register(sub: argparse._SubParsersAction) -> None:
    from .triton_embedded import default_cache_dir

    default_repo = default_model_repository()
    p = sub.add_parser("triton", help="serve a model repository with the embedded Triton server (HTTP, gRPC, metrics)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Start the tritonserver binary shipped in the nvidia-pytriton wheel on a model "
                                   "repository, wait until every model is ready, and stop cleanly on Ctrl-C/SIGTERM.")
    p.add_argument("--model-repository", type=Path, default=default_repo, required=default_repo is None,
                   help="Triton model repository written by `braintumor export`")
    p.add_argument("--http-port", type=int, default=8000, help="port of the KServe v2 HTTP/REST endpoint")
    p.add_argument("--grpc-port", type=int, default=8001, help="port of the KServe v2 gRPC endpoint")
    p.add_argument("--metrics-port", type=int, default=8002, help="port of the Prometheus /metrics endpoint")
    p.add_argument("--address", default="127.0.0.1",
                   help="address every endpoint binds to; Triton has no authentication, so think twice before 0.0.0.0")
    p.add_argument("--startup-timeout", type=float, default=120.0,
                   help="seconds to wait for /v2/health/ready before giving up")
    p.add_argument("--layout", choices=LAYOUTS, default="latency",
                   help="latency (config.pbtxt) or throughput (each model's configs/throughput.pbtxt)")
    p.add_argument("--log-verbose", type=int, default=0, help="tritonserver --log-verbose level (0: off)")
    p.add_argument("--key-file", type=Path, default=default_cache_dir() / "triton.key",
                   help="where to write the random key that inference, model config and metadata need, when neither "
                        "BRAINTUMOR_TRITON_KEY nor BRAINTUMOR_TRITON_KEY_FILE gives one; the front doors read it "
                        "through BRAINTUMOR_TRITON_KEY_FILE")
    p.add_argument("--quiet", action="store_true", help="do not echo the server's log (errors still show its tail)")
    p.set_defaults(func=_triton)
