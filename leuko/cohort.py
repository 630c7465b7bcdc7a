"""A simulated cohort: blood counts drawn per label and paired with ``all_binary`` images.

No public set pairs these smear images with real blood counts. To demonstrate (and test)
the image + clinical fusion method, each image gets values drawn from published presenting
distributions; the draws are reproducible from a seed and from the image's file name.
**A model trained on them learned from simulated values: it demonstrates the method and is
not a clinical result.**

Distributions:
- ALL at presentation (Pui, Robison and Look, *Lancet* 371:1030-1043, 2008; Hunger and
  Mullighan, *N Engl J Med* 373:1541-1552, 2015): WBC below 10 x10^9/L in about half of
  patients and 50 or more in about a fifth (log-normal, median 12, log-sd 1.3); hemoglobin
  usually low (median 7.8 g/dL, sd 2.2); platelets below 100 x10^9/L in about three quarters
  (log-normal, median 50, log-sd 0.9); circulating blasts in about 90% (median 40% of the
  differential when present); neutropenia common (log-normal, median 1.0 x10^9/L); LDH raised
  (median 700 U/L). Age: two thirds children (2-10 years, the incidence peak), the rest adults.
- Normal: the same age mix, values drawn around the middle of the age- and sex-specific
  reference intervals of :mod:`leuko.clinical` (sd a quarter of the interval), so some
  healthy people fall just outside their interval, as in life.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Sequence

import numpy as np

from leuko.clinical import ClinicalValues, band_interval, validate
from leuko.data import Sample

SIMULATED_NOTICE = ("The clinical branch of this model learned from SIMULATED blood counts (leuko.cohort): it "
                    "demonstrates the fusion method and is not a clinical result.")


def _rng(seed: int, key: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _around(rng: np.random.Generator, field: str, age: float, sex: str) -> float:
    reference = band_interval(field, age, sex)
    return float(rng.normal((reference.low + reference.high) / 2, (reference.high - reference.low) / 4))


def simulate(leukemic: bool, rng: np.random.Generator) -> ClinicalValues:
    """One person's values: an ALL patient at presentation when ``leukemic``, else healthy."""
    age = float(rng.uniform(2, 10) if rng.random() < 2 / 3 else rng.uniform(18, 70))
    sex = "male" if rng.random() < 0.55 else "female"
    if leukemic:
        wbc = float(np.clip(rng.lognormal(np.log(12.0), 1.3), 0.5, 900))
        hemoglobin = float(np.clip(rng.normal(7.8, 2.2), 3.0, 15.0))
        platelets = float(np.clip(rng.lognormal(np.log(50.0), 0.9), 3, 600))
        blasts = float(np.clip(rng.normal(40, 25), 1, 98)) if rng.random() < 0.9 else 0.0
        lymph_pct = float(np.clip(rng.normal(30, 15), 2, 98 - blasts))
        neutrophils = float(rng.lognormal(np.log(1.0), 0.9))
        ldh = float(np.clip(rng.lognormal(np.log(700.0), 0.7), 100, 20000))
    else:
        wbc = max(0.5, _around(rng, "wbc", age, sex))
        hemoglobin = max(3.0, _around(rng, "hemoglobin", age, sex))
        platelets = max(10.0, _around(rng, "platelets", age, sex))
        blasts = 0.0
        lymph_pct = float(np.clip(rng.normal(45 if age < 12 else 30, 8), 5, 90))
        neutrophils = max(0.1, _around(rng, "neutrophils_abs", age, sex))
        ldh = max(50.0, _around(rng, "ldh", age, sex))
    lymphocytes = wbc * lymph_pct / 100
    neutrophils = float(min(neutrophils, max(0.0, wbc - lymphocytes - wbc * blasts / 100)))
    mcv = float(np.clip(rng.normal(86, 6), 60, 120))
    values = ClinicalValues(age=round(age, 1), sex=sex, wbc=round(wbc, 2), rbc=round(hemoglobin / 2.9, 2),
                            hemoglobin=round(hemoglobin, 1), hematocrit=round(hemoglobin * 3.0, 1),
                            mcv=round(mcv, 1), platelets=round(platelets, 0), lymphocytes_pct=round(lymph_pct, 1),
                            lymphocytes_abs=round(lymphocytes, 2), neutrophils_abs=round(neutrophils, 2),
                            blasts_pct=round(blasts, 1), ldh=round(ldh, 0))
    return validate(values)


def attach_simulated(samples: Sequence[Sample], positive_index: int, seed: int) -> list[Sample]:
    """The samples with simulated values; the same seed and file names give the same values."""
    return [replace(s, clinical=simulate(s.label == positive_index, _rng(seed, s.path.name))) for s in samples]
