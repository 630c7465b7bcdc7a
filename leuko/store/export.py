"""Exports of the case log: a cases CSV, a one-case PDF report, and a de-identified dataset.

The CSV neutralises spreadsheet formula injection (OWASP: cells starting with =, +, -, @,
tab or carriage return are prefixed with a single quote). The dataset export writes the
reviewed images with a manifest in the shared data's format, so reviewed cases can be read
by ``leuko train --data`` as new training data.
"""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

from fpdf import FPDF

from leuko.store.service import CaseFilter, CaseStore

DISCLAIMER = ("Decision support, not a diagnosis: every result in this report was produced by a machine-learning "
              "model and must be confirmed by a qualified person.")
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(value) -> str:
    """A CSV cell that spreadsheets will not evaluate as a formula."""
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(FORMULA_PREFIXES) else text


def cases_csv(store: CaseStore, filters: CaseFilter | None = None) -> str:
    """One row per image or cell prediction of the matching cases, with the latest review."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["case", "status", "created_at", "created_by", "image", "cell", "task", "model", "label",
                     "confidence", "needs_review", "final_label", "reviewer", "signed_by"])
    page = 1
    while True:
        rows, total = store.list_cases(filters, page=page, page_size=200)
        for row in rows:
            case = store.case(row["id"])
            for image in case.images:
                finals = {r.cell_id: r for r in image.reviews}
                numbers = {cell.id: cell.index for cell in image.cells}
                for prediction in image.predictions:
                    review = finals.get(prediction.cell_id)
                    writer.writerow([safe_cell(v) for v in (
                        case.reference, case.status, case.created_at.isoformat(), case.created_by,
                        image.original_name, numbers.get(prediction.cell_id, ""), prediction.task, prediction.model_id,
                        prediction.label, f"{prediction.confidence:.4f}", prediction.needs_review,
                        review.final_label if review else "", review.reviewer if review else "",
                        case.sign_off.signed_by if case.sign_off else "")])
        if page * 200 >= total:
            break
        page += 1
    return buffer.getvalue()


PDF_MEASURES = (("nucleus_area_px", "nucleus area {:.0f} px"), ("nucleus_area_um2", "nucleus area {:.1f} um2"),
                ("nc_ratio", "N:C ratio {:.2f}"), ("nucleus_circularity", "nucleus circularity {:.2f}"),
                ("contour_irregularity", "contour irregularity {:.2f}"), ("nuclear_lobes", "lobes {:d}"),
                ("chromatin_contrast", "chromatin contrast {:.1f}"))
"""The morphometrics a case report prints, with their formats (the full set is in the app)."""


def measures_line(measures: dict) -> str:
    """The report's one-line summary of a cell's morphometrics (absent measures left out)."""
    return ", ".join(text.format(measures[key]) for key, text in PDF_MEASURES if measures.get(key) is not None)


def _latin(text: str) -> str:
    return text.encode("latin-1", "replace").decode("latin-1")


def case_pdf(store: CaseStore, case_id: int, path: Path, model_summaries: dict[str, str] | None = None) -> Path:
    """A one-case PDF: images with their CAM overlays, probabilities, clinical flags, reviews,
    sign-off, the models' card summaries and the decision-support disclaimer."""
    from leuko.clinical import ClinicalValues, flags

    case = store.case(case_id)
    pdf = FPDF()
    pdf.set_auto_page_break(True, margin=15)
    pdf.add_page()
    pdf.set_font("Helvetica", "B", 16)
    pdf.cell(0, 10, _latin(f"Leuko case report: {case.reference}"), new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("Helvetica", "", 9)
    pdf.multi_cell(0, 5, _latin(DISCLAIMER), new_x="LMARGIN", new_y="NEXT")
    pdf.multi_cell(0, 5, _latin(f"Created {case.created_at:%Y-%m-%d %H:%M} by {case.created_by}; status {case.status}"
                                + (f"; signed by {case.sign_off.signed_by} at {case.sign_off.signed_at:%Y-%m-%d %H:%M}"
                                   if case.sign_off else "")), new_x="LMARGIN", new_y="NEXT")
    if case.notes:
        pdf.multi_cell(0, 5, _latin(f"Notes: {case.notes}"), new_x="LMARGIN", new_y="NEXT")
    if case.clinical:
        values = ClinicalValues(**case.clinical)
        found = flags(values)
        pdf.multi_cell(0, 5, _latin("Clinical values: " + ", ".join(f"{k} {v}" for k, v in values.present().items())),
                       new_x="LMARGIN", new_y="NEXT")
        for flag in found:
            pdf.multi_cell(0, 5, _latin(f"- {flag.describe()}"), new_x="LMARGIN", new_y="NEXT")
    for image in case.images:
        pdf.ln(3)
        pdf.set_font("Helvetica", "B", 11)
        pdf.cell(0, 7, _latin(f"{image.original_name} ({image.kind}, {image.width}x{image.height} px)"),
                 new_x="LMARGIN", new_y="NEXT")
        pdf.set_font("Helvetica", "", 9)
        top = pdf.get_y()
        pictures = [store.files.path(image.stored_path)]
        pictures += [store.files.path(p.cam_path) for p in image.predictions if p.cam_path and p.cell_id is None]
        for k, picture in enumerate(pictures[:2]):
            if picture.suffix.lower() in (".png", ".jpg", ".jpeg") and picture.is_file():
                pdf.image(str(picture), x=10 + 65 * k, y=top, h=45)
        pdf.set_y(top + 47)
        finals = {r.cell_id: r for r in image.reviews}
        numbers = {cell.id: cell.index for cell in image.cells}
        if image.morphometrics:
            pdf.multi_cell(0, 5, _latin(f"Morphometrics: {measures_line(image.morphometrics)}."),
                           new_x="LMARGIN", new_y="NEXT")
        for prediction in image.predictions:
            probabilities = ", ".join(f"{k} {v:.3f}" for k, v in prediction.probabilities.items())
            review = finals.get(prediction.cell_id)
            where = f"cell #{numbers[prediction.cell_id]}: " if prediction.cell_id in numbers else ""
            pdf.multi_cell(0, 5, _latin(
                f"{where}{prediction.label} (confidence {prediction.confidence:.3f}"
                f"{', NEEDS REVIEW' if prediction.needs_review else ''}) by {prediction.model_id}; {probabilities}. "
                + (f"Final: {review.final_label} by {review.reviewer}" + (f" ({review.comment})" if review.comment else "")
                   if review else "Not reviewed yet.")), new_x="LMARGIN", new_y="NEXT")
    if model_summaries:
        pdf.ln(3)
        pdf.set_font("Helvetica", "B", 11)
        pdf.cell(0, 7, "Models", new_x="LMARGIN", new_y="NEXT")
        pdf.set_font("Helvetica", "", 8)
        for model, summary in model_summaries.items():
            pdf.multi_cell(0, 4, _latin(f"{model}: {summary}"), new_x="LMARGIN", new_y="NEXT")
    path.parent.mkdir(parents=True, exist_ok=True)
    pdf.output(str(path))
    return path


def _split_of(sha256: str) -> str:
    bucket = int(sha256[:8], 16) % 10
    return "test" if bucket == 0 else "val" if bucket == 1 else "train"


def export_dataset(store: CaseStore, folder: Path, task: str) -> Path:
    """Crop images of ``task`` from signed-off cases with their final labels, as ``images/``
    plus a ``manifest.csv`` (path, mask, dataset, task, label, split) that training reads
    directly. Only signed cases count, since their labels are final; an image whose signed
    labels disagree between cases is left out rather than given either label.

    File names are the images' sha256, so nothing from the original names (which may carry
    identifiers) leaves the store. The split is fixed by the digest (about 80% train, 10%
    val, 10% test), so an image keeps its split across exports.
    """
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    labels: dict[str, set[str]] = {}
    stored: dict[str, str] = {}
    page = 1
    while True:
        cases, total = store.list_cases(CaseFilter(task=task, status="signed"), page=page, page_size=200)
        for summary in cases:
            for image in store.case(summary["id"]).images:
                finals = [r for r in image.reviews if r.cell_id is None]
                if image.kind != "crop" or not finals:
                    continue
                labels.setdefault(image.sha256, set()).add(finals[-1].final_label)
                stored[image.sha256] = image.stored_path
        if page * 200 >= total:
            break
        page += 1
    rows = []
    for digest, found in sorted(labels.items()):
        if len(found) != 1:
            continue
        name = f"{digest}{Path(stored[digest]).suffix}"
        shutil.copyfile(store.files.path(stored[digest]), folder / "images" / name)
        rows.append((f"images/{name}", "", "leuko_cases", task, found.pop(), _split_of(digest)))
    with open(folder / "manifest.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "mask", "dataset", "task", "label", "split"])
        writer.writerows(rows)
    return folder / "manifest.csv"
