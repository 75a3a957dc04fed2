"""The one API-key rule both front doors apply (serving/api_key.py): HTTP headers and gRPC metadata alike."""

import pytest

from braintumor.serving.api_key import key_accepted, presented_key


@pytest.mark.parametrize("items, presented", [
    ([("x-api-key", "k1")], "k1"),
    ([("authorization", "Bearer k2")], "k2"),
    ([("Authorization", "bearer  k3 ")], "k3"),  # scheme and header name case-insensitive, spaces trimmed
    ([("authorization", "Bearer k2"), ("x-api-key", "k1")], "k1"),  # x-api-key wins whatever the order
    ([("x-api-key", "k1"), ("x-api-key", "k9")], "k1"),
    ([("authorization", "Basic dTpw")], ""),
    ([("x-api-key-bin", b"k1"), ("x-api-key", b"k1")], ""),  # binary metadata is never a key
    ([], ""),
])
def test_presented_key(items, presented):
    assert presented_key(items) == presented


@pytest.mark.parametrize("items, accepted", [
    ([("x-api-key", "secret")], True),
    ([("authorization", "Bearer secret")], True),
    ([("x-api-key", "secreT")], False),
    ([("x-api-key", "")], False),
    ([], False),
])
def test_key_accepted(items, accepted):
    assert key_accepted(items, "secret") is accepted
