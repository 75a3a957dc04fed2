"""Audit of the real BRISC 2025 train split reproduces its known duplicates and colour-mode shortcut."""

from __future__ import annotations

import pytest

from braintumor.train.audit import run_audit


@pytest.mark.integration
def test_audit_of_the_real_train_split(real_data, tmp_path):  # real_data (tests/conftest.py) skips when absent
    report = run_audit(real_data, tmp_path, leakage_sample=600)
    dup = report["duplicates"]
    assert (dup["groups"], dup["files"], dup["extra_copies"]) == (35, 73, 38)
    assert dup["any_mixed_class"] is False
    no_tumor = report["shortcuts"]["no_tumor"]
    assert no_tumor["modes"] == {"RGB": 1067}
    assert no_tumor["non_square"] == 366
    assert report["counts"]["images"]["train"]["total"] == 5000
    assert report["masks"]["count"] == 3933
    assert report["problems"]["count"] == 0
    assert (tmp_path / "audit.md").is_file()
