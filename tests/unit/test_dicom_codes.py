"""The DICOM results' codes: each refer reason the service writes (train/refer.py, serving/postprocess.py) maps to its
own code, never "other", and the out-of-distribution ones are recognised (`braintumor pacs` stores nothing for them)."""

import numpy as np
import pytest

from braintumor.clients import dicom_codes as codes
from braintumor.serving.postprocess import out_of_distribution
from braintumor.train.decode import DecodedImage
from braintumor.train.refer import ReferRules, decide, reasons


def _service_reasons() -> dict[str, str]:
    """code value -> one sentence the service really writes for it."""
    out = {}
    mask = np.zeros((1, 8, 8), np.float32)
    mask[0, 2:6, 2:6] = 1.0  # a mask of 16 px on a no_tumor label: disagreement
    rules = ReferRules(threshold=0.9, disagree_min_area=4, ood_threshold=1.0)
    decision = decide(np.array([[0.1, 0.1, 0.1, 0.7]]), mask, np.array([5.0]), rules)
    for sentence in reasons(decision, 0, rules):
        out[codes.reason(sentence).value] = sentence
    colour = DecodedImage(np.zeros((16, 16), np.uint8), "RGB", True)
    for sentence in out_of_distribution(colour, modality="CT"):
        out[codes.reason(sentence).value] = sentence
    dim = np.zeros((64, 64), np.uint8)
    dim[:4, :4] = 200
    for sentence in out_of_distribution(DecodedImage(dim, "L", False)):
        out[codes.reason(sentence).value] = sentence
    return out


def test_every_service_reason_has_its_code():
    found = _service_reasons()
    assert set(found) == {"LOWCONF", "DISAGREE", "OOD", "COLOUR", "MODALITY", "BLANK"}
    assert codes.reason("a rule added later").value == "OTHER"


@pytest.mark.parametrize("kind, expected", [("LOWCONF", False), ("DISAGREE", False), ("OOD", True),
                                            ("COLOUR", True), ("MODALITY", True), ("BLANK", True)])
def test_out_of_distribution_reasons(kind, expected):
    assert codes.out_of_distribution([_service_reasons()[kind]]) is expected


def test_finding_codes_are_snomed_and_distinct():
    assert {c.scheme_designator for c in codes.FINDINGS.values()} == {"SCT"}
    assert len({c.value for c in codes.FINDINGS.values()}) == 4
    with pytest.raises(ValueError, match="no finding code"):
        codes.finding("astrocytoma")
