"""Bytes nobody should send, sent to both front doors (issue 25): random bytes, truncations and mutations of real
JPEG, PNG and DICOM slices through HTTP /analyze (multipart and JSON) and gRPC Analyze are answered 200 (the bytes
still decode) or a 4xx / INVALID_ARGUMENT naming what is wrong, never 500 / INTERNAL. The decoder itself is fuzzed
with hypothesis in tests/unit/test_decode_fuzz.py; this is the same kind of corpus over the wire, fixed by a seed."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

httpx = pytest.importorskip("httpx")
grpc = pytest.importorskip("grpc")

from braintumor.clients.v1 import braintumor_pb2 as pb  # noqa: E402
from braintumor.clients.v1 import braintumor_pb2_grpc as pb_grpc  # noqa: E402
from braintumor.train.synthetic import synthetic_dicom  # noqa: E402

pytestmark = pytest.mark.integration

REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT}  # a bad image is the caller's fault; nothing else may answer it


def _slice() -> np.ndarray:
    yy, xx = np.mgrid[0:48, 0:40]
    head = (((yy - 24) / 21.0) ** 2 + ((xx - 20) / 17.0) ** 2) <= 1.0
    return (np.where(head, 120, 0) + (yy % 7) * 9).astype(np.uint8)


def _encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_slice()).save(buf, format=fmt)
    return buf.getvalue()


def corpus(seed: int = 25) -> dict[str, bytes]:
    """~80 bodies: 1-3 bytes, random bytes up to 4 KiB, every seed cut at 12 points, 6 header mutations each."""
    rng = np.random.default_rng(seed)
    seeds = {"jpeg": _encoded("JPEG"), "png": _encoded("PNG"),
             "dicom": synthetic_dicom(_slice().astype(np.uint16) * 7, 12, PixelSpacing=[0.5, 0.5])}
    bodies = {"vm-newline": b"vm\n", "one-byte": b"a", "two-bytes": b"\xff\xd8", "three-bytes": b"\x89PN"}
    for n in (4, 17, 256, 4096):
        bodies[f"random-{n}"] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    for name, data in seeds.items():
        for cut in np.linspace(1, len(data) - 1, 12).astype(int):
            bodies[f"{name}-cut-{cut}"] = data[:cut]
        for i in range(6):
            mutated = bytearray(data)
            for pos in rng.integers(0, min(len(data), 512), 4):
                mutated[pos] = int(rng.integers(0, 256))
            bodies[f"{name}-mutated-{i}"] = bytes(mutated)
    return bodies


CORPUS = corpus()


def test_every_body_is_answered_or_refused_by_both_doors(front_doors):
    problems, outcomes = [], {}
    channel = grpc.insecure_channel(front_doors["grpc"])
    stub = pb_grpc.BrainTumorStub(channel)
    try:
        with httpx.Client(base_url=front_doors["http"], timeout=60) as http:
            for name, data in CORPUS.items():
                multipart = http.post("/analyze", files={"image": ("scan.bin", data, "application/octet-stream")})
                as_json = http.post("/analyze", json={"image_base64": base64.b64encode(data).decode()})
                try:
                    stub.Analyze(pb.AnalyzeRequest(image=data), timeout=60)
                    code = grpc.StatusCode.OK
                except grpc.RpcError as exc:
                    code = exc.code()
                    if code not in REFUSALS:
                        problems.append(f"{name}: gRPC {code.name} {exc.details()}")
                for how, answer in (("multipart", multipart), ("JSON", as_json)):
                    if answer.status_code >= 500 or (answer.status_code >= 400 and "detail" not in answer.json()):
                        problems.append(f"{name}: HTTP {how} {answer.status_code} {answer.text[:200]}")
                outcomes[name] = (multipart.status_code, as_json.status_code, code.name)
    finally:
        channel.close()
    assert problems == [], problems
    # the corpus is not all refusals nor all successes: both branches of the decoder are exercised over the wire
    statuses = {s for m, j, _ in outcomes.values() for s in (m, j)}
    assert 200 in statuses and statuses & {400, 415}, outcomes
