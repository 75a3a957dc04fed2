"""What serving/deploy/smoke.sh asks of a running server, through the project's own SDK (braintumor.clients).

    python smoke_client.py label  --url 127.0.0.1:3100 --protocol http [--key KEY] IMAGE
        prints `LABEL P` (the class and its probability) of IMAGE; exit 1 with the SDK's error otherwise
    python smoke_client.py status --url 127.0.0.1:3100 [--key KEY] IMAGE
        prints `STATUS RETRY_AFTER` of one POST /analyze (RETRY_AFTER "-" when the header is absent), no retries

Run with the host's Python that has braintumor installed (the repository's .venv); it only ever connects to the
address it is given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _label(args: argparse.Namespace) -> int:
    from braintumor.clients import BrainTumorClient
    from braintumor.clients.errors import BrainTumorError

    try:
        with BrainTumorClient(args.url, protocol=args.protocol, api_key=args.key, timeout=args.timeout,
                              retries=0) as client:
            result = client.analyze(args.image)
    except BrainTumorError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(result.label, f"{result.probabilities[result.label]:.4f}")
    return 0


def _status(args: argparse.Namespace) -> int:
    import httpx

    headers = {"x-api-key": args.key} if args.key else {}
    files = {"image": (args.image.name, args.image.read_bytes(), "application/octet-stream")}
    url = args.url if "://" in args.url else f"http://{args.url}"
    try:
        response = httpx.post(f"{url}/analyze", headers=headers, files=files, timeout=args.timeout)
    except httpx.HTTPError as exc:
        print(f"no answer: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(response.status_code, response.headers.get("retry-after", "-"))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func in (("label", _label), ("status", _status)):
        p = sub.add_parser(name)
        p.add_argument("--url", required=True, help="host:port of the server")
        p.add_argument("--key", default=None, help="API key (x-api-key)")
        p.add_argument("--timeout", type=float, default=60.0)
        p.add_argument("image", type=Path)
        p.set_defaults(func=func)
        if name == "label":
            p.add_argument("--protocol", choices=("http", "grpc"), required=True)
    args = parser.parse_args(argv)
    if not args.image.is_file():
        parser.error(f"{args.image} is not a file")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
