"""Regenerates the committed gRPC stubs of this folder from ``clients/proto/braintumor/v1/braintumor.proto``.

    python -m braintumor.clients.v1.generate            # rewrite the stubs next to this file
    python -m braintumor.clients.v1.generate --out DIR  # write them elsewhere (the up-to-date test does)

Needs ``grpcio-tools`` (the ``dev`` extra). protoc writes ``braintumor/v1/...`` with an absolute import of the
message module; it is made relative so the stubs work as ``braintumor.clients.v1`` wherever the package lives.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO_ROOT = HERE.parent / "proto"
PROTO = "braintumor/v1/braintumor.proto"
STUBS = ("braintumor_pb2.py", "braintumor_pb2.pyi", "braintumor_pb2_grpc.py")
_ABSOLUTE_IMPORT = "from braintumor.v1 import braintumor_pb2 as"
_RELATIVE_IMPORT = "from . import braintumor_pb2 as"


def generate(out: Path = HERE) -> list[Path]:
    """Write the three stub files into ``out``; returns their paths."""
    try:
        from grpc_tools import protoc
    except ImportError as exc:
        raise RuntimeError("grpcio-tools is not installed; install the dev extra: pip install -e '.[dev]'") from exc

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"--python_out={tmp}", f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}", str(PROTO_ROOT / PROTO)]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO_ROOT / PROTO}")
        generated = Path(tmp) / Path(PROTO).parent
        grpc_module = generated / "braintumor_pb2_grpc.py"
        text = grpc_module.read_text()
        if _ABSOLUTE_IMPORT not in text:
            raise RuntimeError(f"protoc output changed: {_ABSOLUTE_IMPORT!r} not found in {grpc_module.name}")
        grpc_module.write_text(text.replace(_ABSOLUTE_IMPORT, _RELATIVE_IMPORT))
        written = []
        for name in STUBS:
            shutil.copyfile(generated / name, out / name)
            written.append(out / name)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m braintumor.clients.v1.generate",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=HERE, help="folder to write the stubs to (default: this package)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
