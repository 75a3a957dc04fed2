"""One multipart/form-data reader for the gateway (python-multipart's push parser): the front guard parses a body
once, checks it, and leaves the parts in the ASGI scope under :data:`SCOPE_KEY`, where the endpoints' input specs
read them instead of parsing the body again (service.py ``_Input.from_http_request``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from python_multipart.multipart import MultipartParser, parse_options_header


SCOPE_KEY = "braintumor.multipart_parts"  # ASGI scope key: the checked list[Part] of this request's body


@dataclass
class Part:
    """One part: its Content-Disposition header and its bytes."""

    disposition: bytes = b""
    data: bytearray = field(default_factory=bytearray)

    @property
    def options(self) -> dict[bytes, bytes]:
        return parse_options_header(self.disposition)[1]

    @property
    def name(self) -> str:
        return self.options.get(b"name", b"").decode("utf-8", "replace")


def boundary_of(content_type: str) -> bytes | None:
    return parse_options_header(content_type)[1].get(b"boundary")


def read_parts(boundary: bytes, body: bytes) -> list[Part]:
    """The parts of ``body`` in order; python-multipart's FormParserError when it is malformed."""
    parts: list[Part] = []
    header: dict[str, bytes] = {}

    def on_part_begin() -> None:
        parts.append(Part())

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header["field"] = header.get("field", b"") + data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header["value"] = header.get("value", b"") + data[start:end]

    def on_header_end() -> None:
        if header.get("field", b"").lower() == b"content-disposition":
            parts[-1].disposition = header.get("value", b"")
        header.clear()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1].data += data[start:end]

    parser = MultipartParser(boundary, {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                                        "on_header_value": on_header_value, "on_header_end": on_header_end,
                                        "on_part_data": on_part_data})
    parser.write(body)
    parser.finalize()
    return parts
