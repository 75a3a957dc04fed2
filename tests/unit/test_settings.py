"""BRAINTUMOR_* environment variables -> ServeSettings: each value read as its field's type, booleans by word
(``bool("false")`` would be True), bad values named with the variable."""

from dataclasses import dataclass

import pytest

from braintumor.serving.settings import ServeSettings


@dataclass(frozen=True)
class WithFlag(ServeSettings):  # the day a boolean setting appears
    flag: bool = False


def test_numbers_are_read_as_their_fields_type():
    settings = ServeSettings.from_env({"BRAINTUMOR_MAX_BATCH_IMAGES": "8", "BRAINTUMOR_TRITON_TIMEOUT_S": "2.5",
                                       "BRAINTUMOR_API_KEY": "k", "BRAINTUMOR_MAX_IN_FLIGHT": ""})
    assert (settings.max_batch_images, settings.triton_timeout_s, settings.api_key) == (8, 2.5, "k")
    assert settings.max_in_flight == ServeSettings().max_in_flight  # empty: the default


@pytest.mark.parametrize("raw, value", [("false", False), ("0", False), ("No", False), ("off", False),
                                        ("true", True), ("1", True), ("YES", True), (" on ", True)])
def test_booleans_are_read_by_word(raw, value):
    assert WithFlag.from_env({"BRAINTUMOR_FLAG": raw}).flag is value


@pytest.mark.parametrize("env, fragment", [({"BRAINTUMOR_FLAG": "maybe"}, "BRAINTUMOR_FLAG='maybe' is not a valid bool"),
                                           ({"BRAINTUMOR_MAX_BATCH_IMAGES": "many"}, "BRAINTUMOR_MAX_BATCH_IMAGES")])
def test_bad_values_name_the_variable(env, fragment):
    with pytest.raises(ValueError, match=fragment):
        WithFlag.from_env(env)
