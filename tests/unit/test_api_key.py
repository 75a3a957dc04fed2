"""The one API-key rule both front doors apply (serving/api_key.py): HTTP headers and gRPC metadata alike, several
keys (BRAINTUMOR_API_KEY and a `name:key` file), each caller known by a name, never by its key."""

import pytest

from braintumor.serving.api_key import ENV_CALLER, ApiKeys, KeysFileError, presented_key, read_keys_file
from braintumor.serving.settings import ServeSettings

ALICE, BOB, BOB_NEXT = "alice-key-0123456789", "bob-key-0123456789ab", "bob-key-rotated-000000"


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


@pytest.fixture
def keys_file(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"# callers of the service\n\nalice:{ALICE}\n  bob : {BOB}  \nbob:{BOB_NEXT}\n")
    return str(path)


@pytest.mark.parametrize("items, caller", [
    ([("x-api-key", "secret")], ENV_CALLER),
    ([("authorization", "Bearer secret")], ENV_CALLER),
    ([("x-api-key", ALICE)], "name:alice"),
    ([("authorization", f"Bearer {BOB}")], "name:bob"),
    ([("x-api-key", BOB_NEXT)], "name:bob"),  # two keys of one caller (rotation): the same caller
    ([("x-api-key", "secreT")], None),
    ([("x-api-key", ALICE[:-1])], None),  # a prefix is not the key
    ([("x-api-key", ALICE + "x")], None),
    ([("x-api-key", "")], None),
    ([("x-api-key", "name:alice")], None),  # a caller's name is not a key
    ([], None),
])
def test_caller_of_a_presented_key(keys_file, items, caller):
    assert ApiKeys.load("secret", keys_file).caller(items) == caller


def test_one_key_or_none():
    assert ApiKeys.load("secret").caller([("x-api-key", "secret")]) == ENV_CALLER
    assert ApiKeys.load("secret").caller([("x-api-key", ALICE)]) is None
    assert not ApiKeys.load() and ApiKeys.load().caller([("x-api-key", "anything")]) is None


def test_keys_file_callers_and_lines(keys_file):
    assert [(line, key.caller) for line, key in read_keys_file(keys_file)] == [
        (3, "name:alice"), (4, "name:bob"), (5, "name:bob")]
    keys = ApiKeys.load("secret", keys_file)
    assert len(keys) == 4 and keys.callers == {ENV_CALLER, "name:alice", "name:bob"}
    assert ALICE not in repr(keys) and ALICE not in repr(read_keys_file(keys_file))  # keys never in a repr


@pytest.mark.parametrize("text, line, message", [
    (f"alice {ALICE}\n", 1, "expected `name:key`"),
    (f"# ok\nalice:{ALICE}\n:{BOB}\n", 3, "caller name"),
    (f"al ice:{ALICE}\n", 1, "caller name"),
    (f"-alice:{ALICE}\n", 1, "caller name"),
    (f"{'a' * 65}:{ALICE}\n", 1, "caller name"),
    ("alice:\n", 1, "empty"),
    (f"alice:{ALICE[:8]} {ALICE[8:]}\n", 1, "printable ASCII without spaces"),
    (f"alice:{ALICE}é\n", 1, "printable ASCII without spaces"),
    ("alice:short\n", 1, "shorter than 16"),
    (f"alice:{ALICE}\n\nbob:{ALICE}\n", 3, "same key as line 1"),
])
def test_keys_file_errors_name_the_file_and_line_never_the_key(tmp_path, text, line, message):
    path = tmp_path / "keys"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(KeysFileError) as info:
        ApiKeys.load("", str(path))
    assert f"{path}:{line}:" in str(info.value) and message in str(info.value)
    assert ALICE not in str(info.value) and ALICE[:8] not in str(info.value)


@pytest.mark.parametrize("text, message", [("", "no `name:key` line"), ("# only a comment\n\n", "no `name:key` line"),
                                           (b"\xff\xfe", "cannot read")])
def test_keys_file_without_keys_or_unreadable(tmp_path, text, message):
    path = tmp_path / "keys"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(KeysFileError, match=message) as info:
        ApiKeys.load("", str(path))
    assert str(path) in str(info.value)
    with pytest.raises(KeysFileError, match="cannot read") as info:
        ApiKeys.load("", str(tmp_path / "missing"))
    assert str(tmp_path / "missing") in str(info.value)


def test_a_key_in_the_file_and_the_environment_is_refused(keys_file):
    with pytest.raises(KeysFileError, match=r":3: this key is also BRAINTUMOR_API_KEY") as info:
        ApiKeys.load(ALICE, keys_file)
    assert ALICE not in str(info.value)


def test_settings_read_the_keys_file_at_start(keys_file, tmp_path):
    settings = ServeSettings.from_env({"BRAINTUMOR_API_KEYS_FILE": keys_file})
    assert settings.authenticates and settings.api_keys().callers == {"name:alice", "name:bob"}
    assert settings.to_env()["BRAINTUMOR_API_KEYS_FILE"] == keys_file  # children get the path, not the keys
    assert ALICE not in str(settings.to_env())
    bad = tmp_path / "bad"
    bad.write_text("alice:short\n")
    with pytest.raises(ValueError, match=f"{bad}:1:"):
        ServeSettings.from_env({"BRAINTUMOR_API_KEYS_FILE": str(bad)})
    assert not ServeSettings.from_env({}).authenticates
