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
