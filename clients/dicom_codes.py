"""The coded concepts our DICOM results (clients/dicom_results.py) use, and where each comes from.

SNOMED CT (scheme ``SCT``) for what the model finds, DICOM (``DCM``) and UCUM for the report's structure and units, and
a private scheme ``99BRTUM`` (PS3.3 8.2: a designator starting "99" is a private coding scheme) for what no standard
vocabulary names: each class's probability and the reasons a slice is referred.

Findings (SNOMED CT International Edition):

========== ========== ======================================= =====================================================
class      code       meaning                                 source
========== ========== ======================================= =====================================================
glioma     393564001  Glioma                                  public SNOMED code lists for glioma (the brain
                                                              glioma concept; 393563007 is glioblastoma, not it)
meningioma 302820008  Intracranial meningioma (disorder)      SNOMED International release notes, October 2025
                                                              ("Update for Meningioma")
pituitary  254956000  Pituitary adenoma (disorder)            Human Phenotype Ontology HP:0002893 cross-reference
no_tumor   281900007  No abnormality detected (finding)       HL7 FHIR value sets' coding of a negative finding
========== ========== ======================================= =====================================================

The SEG's segment: category ``49755003 Morphologically Abnormal Structure`` and type ``108369006 Neoplasm`` (DICOM CID
7150 / 7151, pydicom's ``codes.SCT``); the algorithm family ``DCM 123110 Artificial Intelligence`` (CID 7162). The
report's procedure: ``241601008 Magnetic resonance imaging of brain (procedure)``. These codes were checked against the
public sources named above, not against a licensed SNOMED browser (none is reachable from this project's machines);
a site should confirm them against its SNOMED release. no_tumor means "no tumour of the three kinds the model knows",
which is narrower than "no abnormality": the report also carries the model's name so a reader knows the scope.
"""

from __future__ import annotations

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

# Who made the objects, and their series (high numbers, out of the way of the modality's series).
MANUFACTURER = "braintumor"
SERIES_NUMBERS = {"seg": 9701, "sr": 9702, "overlay": 9703}
EXPLANATION_LABEL = "MODEL EXPLANATION (Grad-CAM) - NOT A FINDING"
SEG_SERIES_DESCRIPTION = "braintumor tumour segmentation"
SR_SERIES_DESCRIPTION = "braintumor report"
OVERLAY_SERIES_DESCRIPTION = "braintumor Grad-CAM explanation, not a finding"


PRIVATE_SCHEME = "99BRTUM"

FINDINGS: dict[str, Code] = {
    "glioma": Code("393564001", "SCT", "Glioma"),
    "meningioma": Code("302820008", "SCT", "Intracranial meningioma"),
    "pituitary": Code("254956000", "SCT", "Pituitary adenoma"),
    "no_tumor": Code("281900007", "SCT", "No abnormality detected"),
}
SEGMENT_CATEGORY = codes.SCT.MorphologicallyAbnormalStructure  # 49755003
SEGMENT_TYPE = codes.SCT.Neoplasm  # 108369006
ALGORITHM_FAMILY = codes.cid7162.ArtificialIntelligence  # DCM 123110
PROCEDURE = Code("241601008", "SCT", "Magnetic resonance imaging of brain")
AREA = codes.SCT.Area  # 42798000
MM2 = codes.UCUM.SquareMillimeter
PIXELS = Code("{pixels}", "UCUM", "pixels")
NO_UNITS = codes.UCUM.NoUnits  # UCUM "1": a probability
YES, NO = codes.SCT.Yes, codes.SCT.No

REFERRED = Code("REFER", PRIVATE_SCHEME, "Referred for human review")
REFER_REASON = Code("REFREASON", PRIVATE_SCHEME, "Reason for referral")
# The service's refer reasons (train/refer.py's and serving/postprocess.py's sentences) by how each starts;
# tests/unit/test_dicom_codes.py feeds it the service's own sentences.
REASONS: dict[str, Code] = {
    "max probability": Code("LOWCONF", PRIVATE_SCHEME, "Probability under the refer threshold"),
    "mask and label disagree": Code("DISAGREE", PRIVATE_SCHEME, "Mask and label disagree"),
    "out_of_distribution": Code("OOD", PRIVATE_SCHEME, "Out of distribution"),
    "colour photograph": Code("COLOUR", PRIVATE_SCHEME, "Colour image, not an MRI slice"),
    "DICOM modality": Code("MODALITY", PRIVATE_SCHEME, "Modality other than MR"),
    "blank or near-constant": Code("BLANK", PRIVATE_SCHEME, "Blank or mostly blank image"),
    "mostly blank image": Code("BLANK", PRIVATE_SCHEME, "Blank or mostly blank image"),
}
OTHER_REASON = Code("OTHER", PRIVATE_SCHEME, "Other refer rule")
# Reasons that say the image is not a brain MR slice like the training data: `braintumor pacs` stores nothing then.
OUT_OF_DISTRIBUTION = frozenset({"OOD", "COLOUR", "MODALITY", "BLANK"})


def finding(label: str) -> Code:
    try:
        return FINDINGS[label]
    except KeyError:
        raise ValueError(f"label {label!r} has no finding code; expected one of {sorted(FINDINGS)}") from None


def probability(label: str) -> Code:
    """The measurement name of one class's calibrated probability."""
    return Code(f"P-{label.upper()}"[:16], PRIVATE_SCHEME, f"Probability of {label}")


def reason(sentence: str) -> Code:
    return next((code for prefix, code in REASONS.items() if sentence.startswith(prefix)), OTHER_REASON)


def out_of_distribution(reasons) -> bool:
    """Whether any of the service's refer reasons says the image is not an MR slice like the training data."""
    return any(reason(r).value in OUT_OF_DISTRIBUTION for r in reasons)


def highdicom():
    try:
        import highdicom as hd
    except ImportError as exc:  # pragma: no cover - the dicom extra is part of every test install
        raise ImportError("DICOM results need highdicom: pip install 'braintumor[dicom]'") from exc
    return hd


def model_version_tag(analysis) -> str:
    """``name version`` of the model that answered: the SEG's algorithm and the pacs command's idempotence key."""
    if not analysis.model_name or not analysis.model_version:
        raise ValueError("the analysis names no model (name and version); results must say which model made them")
    return f"{analysis.model_name} {analysis.model_version}"
