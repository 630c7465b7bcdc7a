import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from leuko.clinical import (ClinicalValueError, ClinicalValues, convert, flags, likely_unit_slip, reference_range,
                             stored_flags, validate)


@pytest.mark.parametrize("values, field, words", [
    (ClinicalValues(hemoglobin=80), "hemoglobin", "0-25 g/dL"),
    (ClinicalValues(wbc=-1), "wbc", "impossible"),
    (ClinicalValues(platelets=float("nan")), "platelets", "impossible"),
    (ClinicalValues(blasts_pct=120), "blasts_pct", "0-100 %"),
    (ClinicalValues(lymphocytes_pct=70, blasts_pct=40), "lymphocytes_pct", "sum past 100%"),
    (ClinicalValues(wbc=3.0, lymphocytes_abs=2.5, neutrophils_abs=2.0), "lymphocytes_abs", "exceed the WBC"),
    (ClinicalValues(wbc=10.0, lymphocytes_pct=10, lymphocytes_abs=8.0), "lymphocytes_abs", "does not match"),
    (ClinicalValues(sex="unknown"), "sex", "female or male"),
    (ClinicalValues(age="ten"), "age", "not a number"),
])
def test_impossible_values_are_refused_naming_field_and_range(values, field, words):
    with pytest.raises(ClinicalValueError, match=words) as caught:
        validate(values)
    assert caught.value.field == field and str(caught.value).startswith(field)


def test_abnormal_but_possible_values_are_accepted_and_flagged():
    values = ClinicalValues(age=40, sex="female", wbc=250.0, hemoglobin=6.0, platelets=20)
    assert validate(values) is values
    assert {f.name for f in flags(values)} == {"leukocytosis", "anemia", "thrombocytopenia", "bicytopenia"}


def test_lymphocytosis_is_flagged_from_the_percentage_when_no_absolute_count_is_given():
    assert "lymphocytosis" in {f.name for f in flags(ClinicalValues(age=40, wbc=20.0, lymphocytes_pct=80))}
    assert "lymphocytosis" not in {f.name for f in flags(ClinicalValues(age=40, wbc=6.0, lymphocytes_pct=30))}
    assert validate(ClinicalValues(wbc=10.0, lymphocytes_pct=30, lymphocytes_abs=3.1))


def test_unit_conversion():
    assert convert("hemoglobin", 120, "g/L") == pytest.approx(12.0)
    assert convert("hemoglobin", 8.0, "mmol/L") == pytest.approx(12.89, abs=0.01)
    assert convert("wbc", 7500, "/uL") == pytest.approx(7.5)
    assert convert("platelets", 250, "x10^3/uL") == 250
    assert convert("hematocrit", 0.42, "L/L") == pytest.approx(42)
    assert convert("rbc", 4.5e6, "/uL") == pytest.approx(4.5)
    with pytest.raises(ClinicalValueError, match="not supported"):
        convert("hemoglobin", 12, "mg/mL")


@pytest.mark.parametrize("field, flag, low, high, age, sex", [
    ("wbc", "leukopenia", 4.0, None, 40, None),
    ("wbc", "leukocytosis", None, 11.0, 40, None),
    ("wbc", "leukocytosis", None, 15.5, 3, None),
    ("hemoglobin", "anemia", 13.0, None, 40, "male"),
    ("hemoglobin", "anemia", 12.0, None, 40, "female"),
    ("hemoglobin", "anemia", 11.5, None, 8, None),
    ("platelets", "thrombocytopenia", 150.0, None, 40, None),
    ("neutrophils_abs", "neutropenia", 2.0, None, 40, None),
    ("neutrophils_abs", "neutropenia", 1.5, None, 3, None),
    ("lymphocytes_abs", "lymphocytosis", None, 3.0, 40, None),
    ("lymphocytes_abs", "lymphocytosis", None, 8.0, 3, None),
    ("blasts_pct", "circulating blasts", None, 0.0, 40, None),
])
def test_each_flag_at_its_boundary(field, flag, low, high, age, sex):
    def names(value):
        return {f.name for f in flags(ClinicalValues(age=age, sex=sex, **{field: value}))}
    edge = low if low is not None else high
    assert flag not in names(edge), "the limit itself is within the reference range"
    step = -0.01 if low is not None else 0.01
    assert flag in names(edge + step)
    flagged = [f for f in flags(ClinicalValues(age=age, sex=sex, **{field: edge + step})) if f.name == flag][0]
    assert flagged.value == pytest.approx(edge + step) and flagged.range is not None and flagged.meaning


def test_cytopenia_combinations():
    two = ClinicalValues(age=30, sex="male", hemoglobin=9.0, platelets=90, neutrophils_abs=3.0, wbc=6.0)
    assert "bicytopenia" in {f.name for f in flags(two)}
    three = ClinicalValues(age=30, sex="male", hemoglobin=9.0, platelets=90, neutrophils_abs=0.8, wbc=2.0)
    names = {f.name for f in flags(three)}
    assert "pancytopenia" in names and "bicytopenia" not in names
    assert flags(ClinicalValues(age=30, sex="male", hemoglobin=14.5, platelets=250, wbc=7.0)) == []


def test_reference_ranges_depend_on_age_and_sex():
    assert reference_range("hemoglobin", 40, "male").low == 13.0
    assert reference_range("hemoglobin", 40, "female").low == 12.0
    assert reference_range("hemoglobin", 40, None).low == 12.0
    assert reference_range("wbc", 0.5).high == 17.5
    assert reference_range("lymphocytes_pct", 30) is None


@pytest.mark.parametrize("age, sex, hemoglobin, anaemic", [
    (4.0, None, 11.2, False), (5.5, None, 11.2, True), (11.9, "female", 11.8, False), (13.0, "male", 11.9, True),
    (16.0, "male", 12.5, True), (16.0, "female", 12.5, False), (16.0, None, 12.5, False), (0.2, None, 10.6, False)])
def test_anaemia_follows_the_who_age_thresholds(age, sex, hemoglobin, anaemic):
    """WHO: 11.0 g/dL from 6 months, 11.5 from 5 years, 12.0 from 12, and from 15 years 13.0
    for men (12.0 for women); the flag used to wait for the 6- and 18-year band edges."""
    found = {f.name for f in flags(validate(ClinicalValues(age=age, sex=sex, hemoglobin=hemoglobin)))}
    assert ("anemia" in found) == anaemic


number = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**6, 10**6),
                   st.text(max_size=3), st.booleans())


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries({name: number for name in ("age", "wbc", "rbc", "hemoglobin", "hematocrit", "mcv",
                                                          "platelets", "lymphocytes_pct", "lymphocytes_abs",
                                                          "neutrophils_abs", "blasts_pct", "ldh")}),
       st.one_of(st.none(), st.sampled_from(["female", "male", "x", ""])))
def test_no_input_crashes_validation(values, sex):
    entry = ClinicalValues(sex=sex, **values)
    try:
        found = flags(entry)
    except ClinicalValueError as exc:
        assert exc.field and str(exc)
    else:
        assert all(f.name and f.meaning for f in found)
        assert all(v is None or (isinstance(v, (int, float)) and math.isfinite(v)) for k, v in entry.present().items()
                   if k != "sex")


@pytest.mark.parametrize("field, value, unit, right_unit", [
    ("wbc", 5.2, "/uL", "x10^3/uL"), ("platelets", 150.0, "/uL", "x10^3/uL"), ("rbc", 4.5, "/uL", "x10^6/uL"),
    ("hematocrit", 0.45, "%", "L/L")])
def test_a_value_typed_in_the_wrong_unit_is_refused_with_a_hint(field, value, unit, right_unit):
    """WBC 5.2 under /uL is 0.0052 x10^9/L, below any living patient's count: refused with a
    hint about the unit instead of being flagged as leukopenia."""
    with pytest.raises(ClinicalValueError, match="below any reported value.*check the unit"):
        validate(ClinicalValues(**{field: convert(field, value, unit)}))
    assert validate(ClinicalValues(**{field: 0.0})).present() == {field: 0.0}
    right = convert(field, value, right_unit)
    assert validate(ClinicalValues(**{field: right})).present() == {field: right}


def test_a_haematocrit_given_as_a_fraction_has_its_own_hint_which_an_impossible_one_does_not_get():
    with pytest.raises(ClinicalValueError, match=r"0.45 is 45%, or choose L/L") as refused:
        validate(ClinicalValues(hematocrit=0.45))
    assert refused.value.reason.startswith("0.45 % is below any reported value")
    with pytest.raises(ClinicalValueError, match="impossible") as impossible:
        validate(ClinicalValues(hematocrit=85.0))
    assert "L/L" not in impossible.value.reason


def test_a_tiny_manual_neutrophil_count_is_accepted_and_a_likely_slip_only_warned_about():
    """WBC 0.4 x10^9/L with 2% neutrophils is 0.008 x10^9/L, a real count in a neutropenic
    patient; 2.5 typed per microlitre is probably 2.5 x10^3/uL."""
    assert validate(ClinicalValues(wbc=0.4, neutrophils_abs=0.008)).neutrophils_abs == 0.008
    warning = likely_unit_slip("neutrophils_abs", 2.5, "/uL")
    assert "0.0025 x10^9/L" in warning and "x10^3/uL" in warning
    assert likely_unit_slip("neutrophils_abs", 2500.0, "/uL") is None
    assert likely_unit_slip("neutrophils_abs", 2.5, "x10^3/uL") is None
    assert likely_unit_slip("wbc", 5.2, "/uL") is None


def test_a_stored_count_gives_its_flags_or_why_it_could_not_be_checked():
    found, problem = stored_flags(ClinicalValues(wbc=45.0))
    assert [f.name for f in found] == ["leukocytosis"] and problem is None
    found, problem = stored_flags(ClinicalValues(wbc=0.005))
    assert found == [] and "wbc" in problem.lower()
