"""The one error table: each serving error's HTTP status, gRPC code, kind and retry hint, and the kind the gateway
gives an error answer BentoML or Starlette produced, derived from it."""

import pytest

from braintumor.serving import errors
from braintumor.serving.http_middleware import _rewrite


def _classes():
    out, pending = [], [errors.ServingError]
    while pending:
        cls = pending.pop(0)
        out.append(cls)
        pending += cls.__subclasses__()
    return out


@pytest.mark.parametrize("cls", [c for c in _classes() if c is not errors.UpstreamError])
def test_each_status_names_the_kind_of_its_error_class(cls):
    assert errors.KIND_BY_STATUS[cls.http_status] == cls.kind


@pytest.mark.parametrize(("status", "kind"), [(405, "not_supported"), (404, "not_found"), (503, "unavailable"),
                                              (418, "bad_request"), (502, "internal")])
def test_a_foreign_error_answer_gets_the_table_kind(status, kind):
    assert _rewrite(status, b'{"detail": "x"}').startswith(f'{{"error": "{kind}"'.encode())


def test_only_busy_and_unavailable_ask_for_a_retry():
    assert {c.__name__ for c in _classes() if c.retry_after_s} == {"Busy", "Unavailable"}
