"""Blood count and images compared (leuko.concordance): findings where they disagree."""

import pytest

from leuko.clinical import ClinicalValues
from leuko.concordance import findings, share_interval


def test_blasts_in_the_count_and_none_in_the_images():
    found = findings("all_binary", ["normal"], ClinicalValues(blasts_pct=60.0))
    assert len(found) == 1 and "60.0% blasts" in found[0] and "not read as a blast" in found[0]
    found = findings("ball_subtype", ["Benign", "Benign"], ClinicalValues(blasts_pct=12.0))
    assert "none of the 2 cells" in found[0]


def test_blasts_in_the_images_and_none_in_the_count():
    found = findings("all_binary", ["ALL", "normal", "ALL"], ClinicalValues(blasts_pct=0.0))
    assert found == ["2 of the 3 cells in the images were read as blasts, but the blood count reports no blasts. "
                     "Check these cells and the count."]


def test_blasts_agreeing_or_not_measured_give_nothing():
    assert findings("all_binary", ["ALL", "normal"], ClinicalValues(blasts_pct=40.0)) == []
    assert findings("all_binary", ["normal"], ClinicalValues(blasts_pct=0.0)) == []
    assert findings("all_binary", ["ALL"], ClinicalValues(wbc=7.0)) == []
    assert findings("all_binary", ["ALL"], None) == []
    assert findings("all_binary", [], ClinicalValues(blasts_pct=60.0)) == []


def test_blasts_in_the_count_with_a_model_that_has_no_blast_class():
    found = findings("wbc_type", ["lymphocyte"] * 5, ClinicalValues(blasts_pct=30.0))
    assert len(found) == 1 and "no blast class" in found[0]


def test_lymphocytosis_with_few_lymphocytes_in_the_images():
    labels = ["neutrophil"] * 18 + ["lymphocyte"] * 2
    found = findings("wbc_type", labels, ClinicalValues(wbc=14.0, lymphocytes_abs=8.0))
    assert len(found) == 1
    assert "57.1% lymphocytes (a lymphocytosis of 8.0 x10^9/L)" in found[0]
    assert "only 2 of 20 cells (10.0%) as lymphocytes" in found[0]


def test_neutrophilia_with_few_neutrophils_in_the_images():
    labels = ["lymphocyte"] * 6 + ["monocyte"] * 12 + ["neutrophil"] * 2
    found = findings("wbc_type", labels, ClinicalValues(wbc=14.0, neutrophils_abs=11.0, lymphocytes_pct=20.0))
    assert len(found) == 1 and "neutrophilia of 11.0 x10^9/L" in found[0] and "far fewer" in found[0]


def test_more_of_a_type_in_the_images_than_the_count_allows():
    found = findings("wbc_type", ["lymphocyte"] * 18 + ["neutrophil"] * 2, ClinicalValues(lymphocytes_pct=20.0))
    assert len(found) == 1 and "far more" in found[0] and "lymphocytes" in found[0]


def test_shares_within_sampling_error_agree():
    labels = ["lymphocyte"] * 3 + ["neutrophil"] * 7
    assert findings("wbc_type", labels, ClinicalValues(wbc=7.0, lymphocytes_pct=30.0, neutrophils_abs=4.0)) == []
    # One neutrophil crop says nothing about a 30% lymphocyte share.
    assert findings("wbc_type", ["neutrophil"], ClinicalValues(lymphocytes_pct=30.0)) == []
    # An absolute count without the WBC gives no share to compare.
    assert findings("wbc_type", ["neutrophil"] * 30, ClinicalValues(lymphocytes_abs=8.0)) == []


def test_labels_outside_the_task_are_left_out():
    found = findings("wbc_type", ["neutrophil"] * 9 + ["not a leukocyte"] * 20 + ["lymphocyte"],
                     ClinicalValues(lymphocytes_pct=80.0))
    assert "1 of 10 cells" in found[0]


def test_share_interval_matches_the_wilson_interval():
    low, high = share_interval(2, 20)
    assert low == pytest.approx(0.0279, abs=1e-3) and high == pytest.approx(0.301, abs=1e-3)
    assert share_interval(0, 10)[0] == 0.0 and share_interval(10, 10)[1] == pytest.approx(1.0)
