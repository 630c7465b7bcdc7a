"""The case report (PDF) a lab files: its first page read back as text, and every picture
placed within one page's printable area."""

import io
import re

import numpy as np
import pytest
from PIL import Image
from pypdf import PdfReader
from pypdf.generic import ContentStream

from leuko.store import DUPLICATE, NO_LEUKOCYTE, NOT_LEUKOCYTE, CellEntry, ImageEntry
from leuko.store.export import case_pdf
from tests.test_store import png, prediction, store, store_url  # noqa: F401 - fixtures

NOTES = "Ζήτα — ≥5% blasts\nЖ second line: smear from ward 3"
IMPRESSION = "Blasts in the smear, none in the count.\nRefer for flow cytometry."
MM = 72 / 25.4
"""PDF points per millimetre."""


def field_png(width: int, height: int, seed: int = 0) -> bytes:
    """A pink field with a few purple discs, as PNG."""
    rng = np.random.default_rng(seed)
    rgb = np.full((height, width, 3), (236, 214, 220), np.uint8)
    yy, xx = np.mgrid[:height, :width]
    for _ in range(5):
        cy, cx, radius = rng.integers(40, height - 40), rng.integers(40, width - 40), rng.integers(15, 35)
        rgb[(yy - cy) ** 2 + (xx - cx) ** 2 < radius ** 2] = (105, 45, 150)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "PNG")
    return buffer.getvalue()


def field(name: str, width: int, height: int, cells: int, seed: int, **kwargs) -> ImageEntry:
    found = [CellEntry((40 + 90 * k, 60, 70, 70), k == 0, png(1, seed + k),
                       {"cell_area_px": 3000, "nucleus_area_px": 1500, "nc_ratio": 1.0, "nuclear_lobes": 1},
                       prediction(**kwargs)) for k in range(cells)]
    return ImageEntry(field_png(width, height, seed), name, width, height, "field", cells=found)


def crop_entry(seed: int, label: str = "ALL", **shift) -> ImageEntry:
    found = prediction(label=label)
    for key, value in shift.items():
        setattr(found, key, value)
    return ImageEntry(png(0, seed), f"crop{seed}.png", 32, 32, "crop", found,
                      morphometrics={"cell_area_px": 600, "cell_area_um2": 150.0, "nucleus_area_px": 400,
                                     "nucleus_area_um2": 100.0, "nc_ratio": 2.0, "nucleus_perimeter_px": 80.0})


@pytest.fixture
def signed_case(store):
    """A signed case: a field whose four finds are one blast, two lobes of it and a platelet,
    a tall second field, seven crops (one unfamiliar), a blood count and two-line notes."""
    images = [field("lobes.png", 640, 480, 4, 10), field("tall.png", 900, 1700, 2, 20, label="normal"),
              ImageEntry(field_png(640, 480, 30), "empty.png", 640, 480, "field"),
              *[crop_entry(40 + k, "normal" if k % 2 else "ALL") for k in range(6)],
              crop_entry(50, shift_score=7.25, unfamiliar=True)]
    case_id = store.save_case("CASE-ŁÓ-7", "anaЖ", images, notes=NOTES,
                              clinical={"age": 6.0, "sex": "female", "wbc": 40.0, "hemoglobin": 8.0,
                                        "platelets": 30.0, "lymphocytes_abs": 30.0, "blasts_pct": 0.0})
    case = store.case(case_id)
    lobes, tall, empty = case.images[:3]
    for cell, label in zip(lobes.cells, ["ALL", DUPLICATE, DUPLICATE, NOT_LEUKOCYTE]):
        store.review(lobes.id, "rita", label, "lobe of cell 1" if label == DUPLICATE else "", cell_id=cell.id)
    for cell in tall.cells:
        store.review(tall.id, "rita", "normal", cell_id=cell.id)
    store.review(empty.id, "rita", NO_LEUKOCYTE)
    for image in case.images[3:]:
        store.review(image.id, "rita", image.predictions[0].label)
    store.sign_off(case_id, "rita", IMPRESSION)
    return case_id


def _text(page) -> str:
    return " ".join(page.extract_text().split())


def test_the_first_page_sums_the_case_up_for_signing(store, signed_case, tmp_path):
    reader = PdfReader(case_pdf(store, signed_case, tmp_path / "case.pdf"))
    first = _text(reader.pages[0])
    for expected in ("Case report CASE-ŁÓ-7", "by anaЖ", "Signed", "by rita",
                     "10 cell(s) counted over 10 image(s)",
                     "left out: 2 reviewed as 'duplicate', 1 reviewed as 'not a leukocyte'",
                     "ALL blast 5 50.0", "Normal lymphocyte 5 50.0", "Blasts: 5 of 10 cells (50.0%)",
                     "WBC 40 x10^9/L 4.5-13.5 leukocytosis",
                     "Lymphocytes (absolute) 30 x10^9/L 1.5-6.5 lymphocytosis",
                     "Hemoglobin 8 g/dL 11.5-15.5 anemia", "Peripheral blasts % 0 %",
                     "Platelets 30 x10^9/L 150-450 thrombocytopenia", "Blood count: bicytopenia",
                     "This model has not seen images like these: check every result (1 of 1 result(s) marked "
                     "unfamiliar; highest shift score 7.25)", "Blood count against the images: 5 of the 10 cells in the "
                     "images were read as blasts, but the blood count reports no blasts.",
                     "Ζήτα — ≥5% blasts", "Blasts in the smear, none in the count.",
                     "Signed in the case log by rita on", "Name: ", "Signature: ", "Date: "):
        assert expected in first, expected
    assert not re.search(r"\b[a-z]+_(abs|pct)\b", first), "raw field names"
    lines = reader.pages[0].extract_text().splitlines()
    assert any(line.strip().startswith("Ж second line") for line in lines), "the notes' line break"
    assert any(line.strip() == "Refer for flow cytometry." for line in lines), "the impression's line break"
    later = " ".join(_text(page) for page in reader.pages[1:])
    assert "Duplicate (part of another cell), by rita (lobe of cell 1)" in later and "Not a leukocyte, by rita" in later
    assert "Nucleus area (µm²) 100" in later and "Nucleus area 1500 px²" in later
    assert "Sizes in pixels: no pixel size was given for this image." in later
    assert "shift score 7.25: unfamiliar" in later
    assert "No leukocyte was found in this field. Final: no leukocyte, by rita." in later


def _pictures(reader: PdfReader) -> list[tuple[int, float, float, float, float]]:
    """Every image drawn: (page, x, y, width, height) in points from the page's lower left."""
    found = []
    for number, page in enumerate(reader.pages):
        matrix = None
        for operands, operator in ContentStream(page.get_contents(), reader).operations:
            if operator == b"cm":
                matrix = [float(v) for v in operands]
            elif operator == b"Do" and matrix is not None:
                width, _, _, height, x, y = matrix
                found.append((number, x, y, width, height))
    return found


def test_no_picture_is_cut_by_a_page_break(store, signed_case, tmp_path):
    """Each picture lies within the printable area of the page it is on (top margin 10 mm,
    bottom margin 15 mm), the tall field scaled down to fit, and each field picture sits on
    a page that names its image."""
    reader = PdfReader(case_pdf(store, signed_case, tmp_path / "case.pdf"))
    pictures = _pictures(reader)
    assert len(pictures) == 3 + 7 * 2 and len(reader.pages) >= 3
    for number, x, y, width, height in pictures:
        page_height = float(reader.pages[number].mediabox.height)
        page_width = float(reader.pages[number].mediabox.width)
        assert y >= 15 * MM - 0.01 and y + height <= page_height - 10 * MM + 0.01, (number, y, height)
        assert x >= 10 * MM - 0.01 and x + width <= page_width - 10 * MM + 0.01, (number, x, width)
    assert any(height > 100 * MM for _, _, _, _, height in pictures), "the fields are drawn large"
    assert "Image 2 of 10: tall.png" in _text(reader.pages[pictures[1][0]])
