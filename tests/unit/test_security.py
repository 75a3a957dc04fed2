"""Secure by default (issue 13): who may bind where without an API key."""

import pytest

from braintumor.serving.cli import build_parser, main
from braintumor.serving.settings import exposure_warning, is_loopback


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.3.4.5", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("", False), ("::", False), ("10.0.0.5", False), ("example.org", False),
])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


@pytest.mark.parametrize("host, key, warned", [
    ("127.0.0.1", "", False), ("0.0.0.0", "", True), ("0.0.0.0", "k", False), ("10.0.0.5", "", True),
])
def test_exposure_warning(host, key, warned):
    assert (exposure_warning(host, key) is not None) is warned


def test_front_doors_and_triton_default_to_loopback():
    parser = build_parser()
    assert parser.parse_args(["serve"]).host == "127.0.0.1"
    assert parser.parse_args(["grpc-server"]).host == "127.0.0.1"
    assert parser.parse_args(["triton", "--model-repository", "."]).address == "127.0.0.1"


def test_serve_refuses_every_interface_without_a_key(monkeypatch, capsys):
    """Refused before anything starts (no port is bound, no child spawned), with the three ways out."""
    monkeypatch.delenv("BRAINTUMOR_API_KEY", raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--triton-url", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert "BRAINTUMOR_API_KEY" in err and "--allow-unauthenticated" in err and "127.0.0.1" in err


# -- log lines nobody can forge ----------------------------------------------------------------------------------
def test_escape_controls():
    from braintumor.serving.logsafe import escape_controls

    assert escape_controls("/probe\nFAKE\x00\x1b[31m\u2028\x85ok é") == "/probe\\x0aFAKE\\x00\\x1b[31m\\u2028\\x85ok é"


def test_every_log_record_is_escaped_once_installed(caplog, monkeypatch):
    import logging

    from braintumor.serving import logsafe

    previous = logging.getLogRecordFactory()
    monkeypatch.setattr(logsafe, "_installed", False)
    try:
        logsafe.install()
        logsafe.install()  # idempotent: escaped once, not twice
        with caplog.at_level(logging.INFO, logger="any.library"):
            logging.getLogger("any.library").info("path=%s", "/x\nFORGED line\r\x00")
            logging.getLogger("any.library").info("multi\nline message")
    finally:
        logging.setLogRecordFactory(previous)  # the rest of the test session logs as before
    assert [r.getMessage() for r in caplog.records] == ["path=/x\\x0aFORGED line\\x0d\\x00", "multi\\x0aline message"]


def test_client_errors_become_one_info_line_server_errors_stay():
    import logging

    from pydantic import BaseModel, ValidationError

    from braintumor.serving.logsafe import ClientErrorsAtInfo

    class Model(BaseModel):
        x: int

    try:
        Model(x="nope")
    except ValidationError as exc:
        validation = exc
    bentoml = pytest.importorskip("bentoml")
    cases = [(validation, logging.INFO), (bentoml.exceptions.NotFound("no task"), logging.INFO),
             (bentoml.exceptions.BentoMLException("boom"), logging.ERROR), (RuntimeError("bug"), logging.ERROR)]
    for exc, level in cases:
        record = logging.LogRecord("bentoml._internal.server.http_app", logging.ERROR, __file__, 1,
                                   "Exception on %s [%s]", ("/analyze", "POST"), (type(exc), exc, None))
        assert ClientErrorsAtInfo().filter(record)
        assert record.levelno == level, exc
        assert (record.exc_info is None) is (level == logging.INFO)
