"""The gateway parses a multipart body once: the front guard's checked parts (serving/multipart.py) become the
endpoint's input without BentoML reading the body again or writing the files to disk."""

import asyncio

import pytest

pytest.importorskip("bentoml")

from pydantic import ValidationError  # noqa: E402
from starlette.requests import Request  # noqa: E402

from braintumor.serving.multipart import SCOPE_KEY, read_parts  # noqa: E402
from braintumor.serving.service import AnalyzeBatchInput, AnalyzeInput, ExplainInput  # noqa: E402

BOUNDARY = b"xyzzy"


def _body(*fields: tuple[str, bytes, str | None]) -> bytes:
    out = b""
    for name, data, filename in fields:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += b"--" + BOUNDARY + b"\r\nContent-Disposition: " + disposition.encode() + b"\r\n\r\n" + data + b"\r\n"
    return out + b"--" + BOUNDARY + b"--\r\n"


def _request(*fields) -> Request:
    async def receive():  # the body was consumed by the guard: reading it again is the bug this test catches
        raise AssertionError("the endpoint's input read the request body a second time")

    scope = {"type": "http", "method": "POST", "path": "/analyze", "headers": [
        (b"content-type", b"multipart/form-data; boundary=" + BOUNDARY)], SCOPE_KEY: read_parts(BOUNDARY, _body(*fields))}
    return Request(scope, receive)


def _parse(spec, *fields):
    return asyncio.run(spec.from_http_request(_request(*fields), serde=None))


def test_a_file_part_arrives_as_its_bytes_and_form_values_are_validated():
    got = _parse(AnalyzeInput, ("image", b"\xff\xd8jpeg bytes", "a.jpg"), ("heatmap", b"true", None))
    assert got.image == b"\xff\xd8jpeg bytes" and type(got.image) is bytes
    assert got.heatmap is True and got.overlay is False and got.image_base64 is None


def test_several_files_keep_their_order():
    got = _parse(AnalyzeBatchInput, ("images", b"one", "1.png"), ("images", b"two", "2.png"), ("overlay", b"1", None))
    assert got.images == [b"one", b"two"] and got.overlay is True


def test_explain_options_are_typed():
    got = _parse(ExplainInput, ("image", b"x", "x.png"), ("method", b"lime", None), ("num_samples", b"50", None))
    assert (got.method, got.num_samples, got.target, got.image) == ("lime", 50, None, b"x")


@pytest.mark.parametrize("field, value", [("heatmap", b"maybe"), ("overlay", b"")])
def test_a_bad_form_value_is_a_validation_error_naming_the_field(field, value):
    with pytest.raises(ValidationError) as info:
        _parse(AnalyzeInput, ("image", b"x", "x.jpg"), (field, value, None))
    assert info.value.errors()[0]["loc"] == (field,)
    assert "maybe" not in str(info.value)  # inputs are never echoed (hide_input_in_errors)
