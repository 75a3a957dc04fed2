import pytest

from braintumor.train.naming import CLASSES, parse_name, try_parse_name


@pytest.mark.parametrize(
    "stem, label, plane, index",
    [
        ("brisc2025_train_00001_gl_ax_t1", "glioma", "axial", 1),
        ("brisc2025_train_01234_me_co_t1", "meningioma", "coronal", 1234),
        ("brisc2025_test_00007_pi_sa_t1", "pituitary", "sagittal", 7),
        ("brisc2025_train_04999_no_ax_t1", "no_tumor", "axial", 4999),  # the real code is `no`
        ("brisc2025_train_00010_nt_ax_t1", "no_tumor", "axial", 10),  # the dataset README's (wrong) `nt`
        ("BRISC2025_TRAIN_00010_GL_AX_T1", "glioma", "axial", 10),
    ],
)
def test_parse_name(stem, label, plane, index):
    parsed = parse_name(stem)
    assert (parsed.label, parsed.plane, parsed.index) == (label, plane, index)


@pytest.mark.parametrize(
    "stem, fragment",
    [
        ("brisc2025_train_00001_xx_ax_t1", "unknown tumour code 'xx'"),
        ("brisc2025_train_00001_gl_zz_t1", "unknown plane code 'zz'"),
        ("IMG_0001", "does not follow"),
        ("brisc2025_train_00001_gl_ax_t2", "does not follow"),
    ],
)
def test_parse_name_errors_name_the_file(stem, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_name(stem)
    assert try_parse_name(stem) is None


def test_class_order_is_fixed():
    assert CLASSES == ("glioma", "meningioma", "pituitary", "no_tumor")


def test_the_sdk_reads_the_same_class_order_and_codes():
    """clients/ may not import train/: its restated grammar (score --evaluate) must equal the training side's."""
    from braintumor.clients import brisc_layout
    from braintumor.train import naming

    assert brisc_layout.CLASSES == naming.CLASSES and brisc_layout.TUMOUR_CODES == naming.TUMOUR_CODES
    assert naming.CLASS_CODES == {"glioma": "gl", "meningioma": "me", "pituitary": "pi", "no_tumor": "no"}
