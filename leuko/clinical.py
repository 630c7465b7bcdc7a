"""Complete blood count (CBC) and clinical values: schema, units, validation, reference
ranges by age band and sex, and flags.

Reference intervals are approximate consensus values; laboratories must substitute their
own. Sources:
- Haemoglobin lower limits (anaemia): WHO, *Haemoglobin concentrations for the diagnosis of
  anaemia and assessment of severity*, WHO/NMH/NHD/MNM/11.1 (2011): 11.0 g/dL at 6-59
  months, 11.5 at 5-11 years, 12.0 at 12-14 years and for non-pregnant women, 13.0 for men.
- Adult intervals (WBC 4.0-11.0, neutrophils 2.0-7.0, lymphocytes 1.0-3.0 x10^9/L,
  platelets 150-410 x10^9/L, RBC, haematocrit, MCV): Bain, Bates and Laffan, *Dacie and Lewis
  Practical Haematology*, 12th ed. (2017), chapter 2 (normal ranges).
- Paediatric intervals (WBC, lymphocytes, neutrophils, MCV by age): *The Harriet Lane
  Handbook*, 22nd ed. (2020), haematology chapter, age-specific blood cell values.
- LDH: adult 140-280 U/L, higher in children (method-dependent; check the local assay).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Literal

Sex = Literal["female", "male"]


class ClinicalValueError(ValueError):
    """An impossible value; ``field`` names it and the message gives the accepted range."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


@dataclass
class ClinicalValues:
    """Clinical and CBC values; every field is optional (``None`` when not measured).

    Units: age in years; WBC, platelets, lymphocytes_abs and neutrophils_abs in x10^9/L;
    RBC in x10^12/L; hemoglobin in g/dL; hematocrit and the percentages in %; MCV in fL;
    LDH in U/L.
    """

    age: float | None = None
    sex: Sex | None = None
    wbc: float | None = None
    rbc: float | None = None
    hemoglobin: float | None = None
    hematocrit: float | None = None
    mcv: float | None = None
    platelets: float | None = None
    lymphocytes_pct: float | None = None
    lymphocytes_abs: float | None = None
    neutrophils_abs: float | None = None
    blasts_pct: float | None = None
    ldh: float | None = None

    def present(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


UNITS = {"age": "years", "wbc": "x10^9/L", "rbc": "x10^12/L", "hemoglobin": "g/dL", "hematocrit": "%",
         "mcv": "fL", "platelets": "x10^9/L", "lymphocytes_pct": "%", "lymphocytes_abs": "x10^9/L",
         "neutrophils_abs": "x10^9/L", "blasts_pct": "%", "ldh": "U/L"}

LABELS = {"age": "Age", "sex": "Sex", "wbc": "WBC", "rbc": "RBC", "hemoglobin": "Hemoglobin",
          "hematocrit": "Hematocrit", "mcv": "MCV", "platelets": "Platelets",
          "lymphocytes_pct": "Lymphocytes %", "lymphocytes_abs": "Lymphocytes (absolute)",
          "neutrophils_abs": "Neutrophils (absolute)", "blasts_pct": "Peripheral blasts %", "ldh": "LDH"}

POSSIBLE = {"age": (0.0, 120.0), "wbc": (0.0, 1000.0), "rbc": (0.0, 10.0), "hemoglobin": (0.0, 25.0),
            "hematocrit": (0.0, 80.0), "mcv": (40.0, 160.0), "platelets": (0.0, 5000.0),
            "lymphocytes_pct": (0.0, 100.0), "lymphocytes_abs": (0.0, 1000.0), "neutrophils_abs": (0.0, 1000.0),
            "blasts_pct": (0.0, 100.0), "ldh": (0.0, 50000.0)}
"""Physiologically possible limits: values outside are data-entry errors, not disease
(a WBC of several hundred x10^9/L does occur in hyperleukocytic leukemia)."""

UNIT_SLIP_BELOW = {"wbc": 0.01, "platelets": 1.0, "rbc": 0.1, "hematocrit": 1.0}
"""Values that analysers report as 0 or from these up, in the schema's units: a value above 0
and below is a unit slip, refused rather than flagged as a cytopenia: a count in x10^3/uL
typed under the unit /uL (WBC 5.2 becoming 0.0052 x10^9/L; RBC 4.5 in x10^6/uL becoming
0.0000045 x10^12/L), or a haematocrit given as a fraction (0.45) under the unit %. Absolute
neutrophil and lymphocyte counts have no floor: a manual differential of a WBC of 0.4 with
2% neutrophils gives 0.008 x10^9/L (the Analyze page warns instead, see
:func:`likely_unit_slip`)."""

UNIT_HINTS = {"hematocrit": " (check the unit: a fraction such as 0.45 is 45%, or choose L/L)"}
"""Hints for a value refused as a unit slip, where the general one about counts per
microlitre does not apply."""

CONVERSIONS: dict[str, dict[str, float]] = {
    "hemoglobin": {"g/dL": 1.0, "g/L": 0.1, "mmol/L": 1.611},
    "wbc": {"x10^9/L": 1.0, "/uL": 1e-3, "x10^3/uL": 1.0},
    "platelets": {"x10^9/L": 1.0, "/uL": 1e-3, "x10^3/uL": 1.0},
    "lymphocytes_abs": {"x10^9/L": 1.0, "/uL": 1e-3, "x10^3/uL": 1.0},
    "neutrophils_abs": {"x10^9/L": 1.0, "/uL": 1e-3, "x10^3/uL": 1.0},
    "rbc": {"x10^12/L": 1.0, "/uL": 1e-6, "x10^6/uL": 1.0},
    "hematocrit": {"%": 1.0, "L/L": 100.0},
}
"""Multipliers from alternative units to the schema's units (1 g/dL = 0.6206 mmol/L of
haemoglobin monomer; 1 x10^9/L = 1000 per microlitre)."""


def likely_unit_slip(field: str, value: float, unit: str) -> str | None:
    """A warning when a count typed per microlitre is so small (under 10) that it was probably
    read off an analyser in thousands per microlitre (neutrophils 2.5 meaning 2,500/uL), for
    the counts that :data:`UNIT_SLIP_BELOW` cannot refuse; ``None`` otherwise."""
    if unit != "/uL" or not 0 < value < 10 or field in UNIT_SLIP_BELOW:
        return None
    return (f"{value:g} per microlitre is {convert(field, value, unit):g} {UNITS[field]}; if the analyser printed "
            f"{value:g} x10^3/uL, choose that unit")


def convert(field: str, value: float, unit: str) -> float:
    """Convert ``value`` of ``field`` from ``unit`` to the schema's unit."""
    table = CONVERSIONS.get(field, {UNITS.get(field, ""): 1.0})
    if unit not in table:
        raise ClinicalValueError(field, f"unit {unit!r} is not supported; use one of {', '.join(table)}")
    return value * table[unit]


def _lymphocytes_from_percentage(values: ClinicalValues) -> float | None:
    """The absolute lymphocyte count (x10^9/L) that the WBC and the lymphocyte percentage
    imply, or ``None`` without both."""
    if values.wbc is None or values.lymphocytes_pct is None:
        return None
    return values.wbc * values.lymphocytes_pct / 100.0


def validate(values: ClinicalValues) -> ClinicalValues:
    """Refuse impossible values with a message naming the field and the accepted range.

    Checks: numbers are finite and within :data:`POSSIBLE`; sex is female or male; the
    absolute lymphocyte and neutrophil counts together do not exceed the WBC (5% slack
    for rounding); lymphocyte and blast percentages together do not exceed 100%; an
    absolute lymphocyte count given with the WBC and the lymphocyte percentage matches
    their product (15% + 0.3 x10^9/L slack).
    """
    for item in fields(ClinicalValues):
        value = getattr(values, item.name)
        if value is None:
            continue
        if item.name == "sex":
            if value not in ("female", "male"):
                raise ClinicalValueError("sex", f"{value!r} is not accepted; use female or male (or leave empty)")
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ClinicalValueError(item.name, f"{value!r} is not a number")
        low, high = POSSIBLE[item.name]
        hint = (" (check the unit: a count per microlitre and one in thousands or millions per microlitre differ "
                "1000-fold or more)" if "/uL" in CONVERSIONS.get(item.name, {}) else "")
        if not math.isfinite(value) or not low <= value <= high:
            raise ClinicalValueError(item.name, f"{value:g} {UNITS[item.name]} is impossible; accepted range is "
                                                f"{low:g}-{high:g} {UNITS[item.name]}{hint}")
        if 0 < value < UNIT_SLIP_BELOW.get(item.name, 0):
            raise ClinicalValueError(item.name, f"{value:g} {UNITS[item.name]} is below any reported value (0, or "
                                                f"{UNIT_SLIP_BELOW[item.name]:g} and above)"
                                                f"{UNIT_HINTS.get(item.name, hint)}")
    if values.lymphocytes_pct is not None and values.blasts_pct is not None \
            and values.lymphocytes_pct + values.blasts_pct > 100.0:
        raise ClinicalValueError("lymphocytes_pct", f"lymphocytes {values.lymphocytes_pct}% and blasts "
                                                    f"{values.blasts_pct}% sum past 100%")
    expected = _lymphocytes_from_percentage(values)
    if expected is not None and values.lymphocytes_abs is not None:
        if abs(expected - values.lymphocytes_abs) > 0.15 * expected + 0.3:
            raise ClinicalValueError("lymphocytes_abs", f"{values.lymphocytes_abs:g} x10^9/L does not match "
                                                        f"{values.lymphocytes_pct:g}% of the WBC ({expected:.2f} x10^9/L)")
    absolute = sum(v for v in (values.lymphocytes_abs, values.neutrophils_abs) if v is not None)
    if values.wbc is not None and absolute > values.wbc * 1.05 + 0.05:
        raise ClinicalValueError("lymphocytes_abs", f"lymphocyte and neutrophil counts ({absolute:g} x10^9/L) "
                                                    f"exceed the WBC ({values.wbc:g} x10^9/L)")
    return values


@dataclass(frozen=True)
class Range:
    low: float
    high: float


AGE_BANDS = ((0.0, 1.0, "infant"), (1.0, 6.0, "1-5 y"), (6.0, 12.0, "6-11 y"), (12.0, 18.0, "12-17 y"),
             (18.0, 200.0, "adult"))

REFERENCE: dict[str, dict[str, Range]] = {
    "wbc": {"infant": Range(6.0, 17.5), "1-5 y": Range(5.5, 15.5), "6-11 y": Range(4.5, 13.5),
            "12-17 y": Range(4.5, 11.0), "adult": Range(4.0, 11.0)},
    "lymphocytes_abs": {"infant": Range(4.0, 13.5), "1-5 y": Range(2.0, 8.0), "6-11 y": Range(1.5, 6.5),
                        "12-17 y": Range(1.2, 5.2), "adult": Range(1.0, 3.0)},
    "neutrophils_abs": {"infant": Range(1.0, 8.5), "1-5 y": Range(1.5, 8.5), "6-11 y": Range(1.5, 8.0),
                        "12-17 y": Range(1.8, 8.0), "adult": Range(2.0, 7.0)},
    "platelets": {band: Range(150.0, 450.0) for band in ("infant", "1-5 y", "6-11 y", "12-17 y")}
    | {"adult": Range(150.0, 410.0)},
    "mcv": {"infant": Range(70.0, 86.0), "1-5 y": Range(70.0, 86.0), "6-11 y": Range(77.0, 95.0),
            "12-17 y": Range(78.0, 98.0), "adult": Range(83.0, 101.0)},
    "ldh": {band: Range(140.0, 400.0) for band in ("infant", "1-5 y", "6-11 y", "12-17 y")}
    | {"adult": Range(140.0, 280.0)},
    "blasts_pct": {band: Range(0.0, 0.0) for band in ("infant", "1-5 y", "6-11 y", "12-17 y", "adult")},
}

HEMOGLOBIN = {"infant": Range(10.5, 14.0), "1-5 y": Range(11.0, 14.0), "6-11 y": Range(11.5, 15.5),
              "12-17 y": Range(12.0, 16.0), "adult female": Range(12.0, 16.0), "adult male": Range(13.0, 17.0)}
WHO_ANAEMIA_BELOW = ((0.5, 11.0, 11.0), (5.0, 11.5, 11.5), (12.0, 12.0, 12.0), (15.0, 12.0, 13.0))
"""WHO anaemia thresholds (g/dL) from each age (years) to the next, as (age, women and
children, men) (WHO 2011, above). They set haemoglobin's lower limit from six months on, so
the limits change at 5, 12 and 15 years, not at the other tables' band edges."""
HEMATOCRIT = {"child": Range(33.0, 45.0), "adult female": Range(36.0, 46.0), "adult male": Range(40.0, 50.0)}
RBC = {"child": Range(3.9, 5.3), "adult female": Range(3.8, 4.8), "adult male": Range(4.5, 5.5)}


def age_band(age: float | None) -> str:
    """The reference band of an age in years; adults when the age is unknown."""
    if age is None:
        return "adult"
    return next(name for low, high, name in AGE_BANDS if low <= age < high)


def band_interval(field: str, age: float | None = None, sex: Sex | None = None) -> Range | None:
    """The interval of ``field`` in the age band's and sex's table; ``None`` if none applies.
    The simulated cohort (:mod:`leuko.cohort`) draws healthy values from these.

    For sex-dependent adult values with the sex unknown, the female lower and male upper
    limits are combined, so no value is flagged merely because the sex is missing.
    """
    band = age_band(age)
    if field in REFERENCE:
        return REFERENCE[field][band]
    table = {"hemoglobin": HEMOGLOBIN, "hematocrit": HEMATOCRIT, "rbc": RBC}.get(field)
    if table is None:
        return None
    if band != "adult":
        return table.get(band, table.get("child"))
    if sex is None:
        return Range(table["adult female"].low, table["adult male"].high)
    return table[f"adult {sex}"]


def reference_range(field: str, age: float | None = None, sex: Sex | None = None) -> Range | None:
    """The reference interval that flags ``field`` (:func:`band_interval`), with
    haemoglobin's lower limit at the WHO anaemia threshold for the age and sex."""
    interval = band_interval(field, age, sex)
    if field == "hemoglobin" and age is not None and age >= WHO_ANAEMIA_BELOW[0][0]:
        others, men = next(limits for start, *limits in reversed(WHO_ANAEMIA_BELOW) if age >= start)
        interval = Range(men if sex == "male" else others, interval.high)
    return interval


@dataclass(frozen=True)
class Flag:
    """An abnormal finding: its name, the value and reference range, and what it means."""

    name: str
    field: str | None
    value: float | None
    range: Range | None
    meaning: str

    def describe(self) -> str:
        if self.value is None or self.range is None:
            return f"{self.name}: {self.meaning}"
        unit = UNITS.get(self.field or "", "")
        return (f"{self.name}: {self.value:g} {unit} (reference {self.range.low:g}-{self.range.high:g} {unit}). "
                f"{self.meaning}")


MEANINGS = {
    "leukocytosis": "Raised white cell count: infection, inflammation, or a leukemic process.",
    "leukopenia": "Low white cell count: marrow failure or infiltration, infection or drugs.",
    "anemia": "Low hemoglobin: reduced oxygen-carrying capacity; in leukemia, marrow replacement.",
    "thrombocytopenia": "Low platelets: bleeding risk; in leukemia, marrow replacement.",
    "neutropenia": "Low neutrophils: infection risk; suggests marrow failure or infiltration.",
    "lymphocytosis": "Raised lymphocytes: viral infection, or a lymphoproliferative disorder.",
    "circulating blasts": "Blasts in peripheral blood are never normal: an acute leukemia must be excluded.",
    "bicytopenia": "Two lineages low: suspect marrow failure or infiltration; a marrow examination may be needed.",
    "pancytopenia": "All three lineages low: marrow failure or infiltration (acute leukemia among the causes).",
}


def flags(values: ClinicalValues) -> list[Flag]:
    """Validate, then list every abnormal finding with its value, range and meaning. An
    absolute lymphocyte count left empty is taken as the lymphocyte percentage of the WBC."""
    validate(values)
    derived = _lymphocytes_from_percentage(values)
    if values.lymphocytes_abs is None and derived is not None:
        values = replace(values, lymphocytes_abs=round(derived, 2))
    found: list[Flag] = []

    def check(field: str, low_name: str | None, high_name: str | None) -> None:
        value = getattr(values, field)
        reference = reference_range(field, values.age, values.sex)
        if value is None or reference is None:
            return
        if low_name and value < reference.low:
            found.append(Flag(low_name, field, value, reference, MEANINGS[low_name]))
        if high_name and value > reference.high:
            found.append(Flag(high_name, field, value, reference, MEANINGS[high_name]))

    check("wbc", "leukopenia", "leukocytosis")
    check("hemoglobin", "anemia", None)
    check("platelets", "thrombocytopenia", None)
    check("neutrophils_abs", "neutropenia", None)
    check("lymphocytes_abs", None, "lymphocytosis")
    check("blasts_pct", None, "circulating blasts")
    names = {f.name for f in found}
    low_lineages = [("anemia" in names), ("thrombocytopenia" in names),
                    ("neutropenia" in names or "leukopenia" in names)]
    if all(low_lineages):
        found.append(Flag("pancytopenia", None, None, None, MEANINGS["pancytopenia"]))
    elif sum(low_lineages) == 2:
        found.append(Flag("bicytopenia", None, None, None, MEANINGS["bicytopenia"]))
    return found


def stored_flags(values: ClinicalValues) -> tuple[list[Flag], str | None]:
    """The flags of a blood count read back from the case log, and ``None``; or no flags and
    why the count could not be checked when it no longer passes validation (it was saved
    under earlier limits), so a stored case is shown as saved instead of failing."""
    try:
        return flags(values), None
    except ClinicalValueError as exc:
        return [], str(exc)


NUMERIC_FIELDS = ("age", "wbc", "rbc", "hemoglobin", "hematocrit", "mcv", "platelets", "lymphocytes_pct",
                  "lymphocytes_abs", "neutrophils_abs", "blasts_pct", "ldh")
ENCODING_SCALE = {"age": (30.0, 25.0), "wbc": (7.0, 1.0), "rbc": (4.7, 0.8), "hemoglobin": (14.0, 2.5),
                  "hematocrit": (42.0, 6.0), "mcv": (90.0, 10.0), "platelets": (250.0, 1.0),
                  "lymphocytes_pct": (30.0, 20.0), "lymphocytes_abs": (2.0, 1.0), "neutrophils_abs": (4.0, 1.0),
                  "blasts_pct": (0.0, 20.0), "ldh": (200.0, 1.0)}
"""Per field (centre, spread) for the network's input: counts are log-scaled (spread 1.0
means the natural log of value / centre), the rest standardised."""
LOG_FIELDS = {"wbc", "platelets", "lymphocytes_abs", "neutrophils_abs", "ldh"}
ENCODING_SIZE = 2 * len(NUMERIC_FIELDS) + 3
"""Encoded features: each numeric value and its missing indicator, then female, male and
sex-missing indicators."""


def encode(values: ClinicalValues | None) -> list[float]:
    """The fusion network's input vector for ``values`` (``None``: everything missing).

    Missing values are 0 with their indicator set to 1, so the network learns to rely on
    the image when the blood count is absent.
    """
    out: list[float] = []
    for name in NUMERIC_FIELDS:
        value = None if values is None else getattr(values, name)
        if value is None:
            out += [0.0, 1.0]
            continue
        centre, spread = ENCODING_SCALE[name]
        scaled = math.log((value + 0.1) / (centre + 0.1)) if name in LOG_FIELDS else (value - centre) / spread
        out += [float(max(-6.0, min(6.0, scaled))), 0.0]
    sex = None if values is None else values.sex
    out += [float(sex == "female"), float(sex == "male"), float(sex is None)]
    return out


def missing_encoding(batch: int):
    """A (batch, ENCODING_SIZE) tensor meaning "no clinical value measured"."""
    import torch

    return torch.tensor([encode(None)] * batch, dtype=torch.float32)


def from_row(row: dict) -> ClinicalValues | None:
    """Clinical values from a manifest row's columns named as the schema's fields (in the
    schema's units); empty cells are missing; ``None`` when the row has no such column."""
    present = {name: row[name] for name in [f.name for f in fields(ClinicalValues)] if name in row}
    if not present:
        return None
    parsed = {}
    for name, raw in present.items():
        if raw in ("", None) or (isinstance(raw, float) and math.isnan(raw)):
            continue
        parsed[name] = str(raw) if name == "sex" else float(raw)
    return validate(ClinicalValues(**parsed))
