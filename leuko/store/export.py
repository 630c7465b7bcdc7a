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

from leuko.store.models import as_utc
from leuko.store.service import CaseFilter, CaseStore

DISCLAIMER = ("Decision support, not a diagnosis: every result in this report was produced by a machine-learning "
              "model and must be confirmed by a qualified person.")
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(value) -> str:
    """A CSV cell that spreadsheets will not evaluate as a formula."""
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(FORMULA_PREFIXES) else text


def cases_csv(store: CaseStore, filters: CaseFilter | None = None) -> str:
    """One row per image or cell prediction of the matching cases, with the latest review; an
    image with no prediction (a field in which no leukocyte was found) gets one row of its own,
    marked as needing review, with the review that confirmed it. The last columns are the
    prediction's shift score, whether it is unfamiliar and why the question does not apply,
    empty where not measured."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["case", "status", "created_at", "created_by", "image", "cell", "task", "model", "label",
                     "confidence", "needs_review", "final_label", "reviewer", "signed_by", "shift_score",
                     "unfamiliar", "not_applicable"])
    page = 1
    while True:
        rows, total = store.list_cases(filters, page=page, page_size=200)
        for row in rows:
            case = store.case(row["id"])
            for image in case.images:
                finals = {r.cell_id: r for r in image.reviews}
                numbers = {cell.id: cell.index for cell in image.cells}
                results = [(p.cell_id, (numbers.get(p.cell_id, ""), p.task, p.model_id, p.label,
                                        f"{p.confidence:.4f}", p.needs_review),
                            ("" if p.shift_score is None else f"{p.shift_score:.4f}", p.unfamiliar, p.not_applicable))
                           for p in image.predictions]
                for cell_id, result, shift in results or [(None, ("", "", "", "", "", True), ("", "", ""))]:
                    review = finals.get(cell_id)
                    writer.writerow([safe_cell(v) for v in (
                        case.reference, case.status, as_utc(case.created_at).isoformat(), case.created_by,
                        image.original_name, *result, review.final_label if review else "",
                        review.reviewer if review else "", case.sign_off.signed_by if case.sign_off else "",
                        *shift)])
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


REPORT_FONT = "DejaVu"
"""The report's font: DejaVu Sans, shipped with matplotlib, covers Greek, Cyrillic and the
symbols clinicians type (the PDF core fonts hold Latin-1 only and printed '?' for the rest)."""


def _report_pdf() -> FPDF:
    """An empty report with the Unicode font registered in its regular and bold styles."""
    from matplotlib import font_manager

    pdf = FPDF()
    for style, weight in (("", "normal"), ("B", "bold")):
        font = font_manager.FontProperties(family="DejaVu Sans", weight=weight)
        pdf.add_font(REPORT_FONT, style, font_manager.findfont(font, fallback_to_default=False))
    return pdf


def _review_text(review) -> str:
    """A review as the report prints it: final label, reviewer and comment."""
    if review is None:
        return "Not reviewed yet."
    return f"Final: {review.final_label} by {review.reviewer}" + (f" ({review.comment})" if review.comment else "")


def _differential_lines(image, finals: dict) -> list[str]:
    """A field's count per class (the reviewer's final label where there is one, else the
    model's) with percentages, and the share read as blasts for tasks that have blast
    classes."""
    from leuko.tasks import get_task

    labels = [finals[p.cell_id].final_label if p.cell_id in finals else p.label
              for p in image.predictions if p.cell_id is not None]
    if not labels:
        return []
    task = get_task(image.predictions[0].task)
    lines = [f"Differential (reviewed labels where given): {task.differential_text(labels)}."]
    blasts = task.blast_count(labels)
    if blasts is not None:
        lines.append(f"Cells read as blasts: {blasts} of {len(labels)} ({task.blast_percent(labels):.0f}%).")
    return lines


def case_pdf(store: CaseStore, case_id: int, path: Path, model_summaries: dict[str, str] | None = None) -> Path:
    """A one-case PDF: images with their CAM overlays, probabilities, clinical flags, reviews,
    sign-off, the models' card summaries and the decision-support disclaimer."""
    from leuko.clinical import UNITS, ClinicalValues, stored_flags

    case = store.case(case_id)
    pdf = _report_pdf()
    pdf.set_auto_page_break(True, margin=15)
    pdf.add_page()
    pdf.set_font(REPORT_FONT, "B", 16)
    pdf.cell(0, 10, f"Leuko case report: {case.reference}", new_x="LMARGIN", new_y="NEXT")
    pdf.set_font(REPORT_FONT, "", 9)
    pdf.multi_cell(0, 5, DISCLAIMER, new_x="LMARGIN", new_y="NEXT")
    pdf.multi_cell(0, 5, f"Created {case.created_at:%Y-%m-%d %H:%M} by {case.created_by}; status {case.status}"
                   + (f"; signed by {case.sign_off.signed_by} at {case.sign_off.signed_at:%Y-%m-%d %H:%M}"
                      if case.sign_off else ""), new_x="LMARGIN", new_y="NEXT")
    if case.notes:
        pdf.multi_cell(0, 5, f"Notes: {case.notes}", new_x="LMARGIN", new_y="NEXT")
    if case.clinical:
        values = ClinicalValues(**case.clinical)
        pdf.multi_cell(0, 5, "Clinical values: " + ", ".join(
            f"{k} {v:g} {UNITS[k]}" if k in UNITS else f"{k} {v}" for k, v in values.present().items()),
                       new_x="LMARGIN", new_y="NEXT")
        found, problem = stored_flags(values)
        findings = [f"- {flag.describe()}" for flag in found]
        if problem:
            findings.append(f"- the blood count could not be checked: {problem}")
        for line in findings:
            pdf.multi_cell(0, 5, line, new_x="LMARGIN", new_y="NEXT")
    for image in case.images:
        pdf.ln(3)
        pdf.set_font(REPORT_FONT, "B", 11)
        pdf.cell(0, 7, f"{image.original_name} ({image.kind}, {image.width}x{image.height} px)",
                 new_x="LMARGIN", new_y="NEXT")
        pdf.set_font(REPORT_FONT, "", 9)
        top = pdf.get_y()
        pictures = [store.files.path(image.stored_path)]
        pictures += [store.files.path(p.cam_path) for p in image.predictions if p.cam_path and p.cell_id is None]
        for k, picture in enumerate(pictures[:2]):
            if picture.suffix.lower() in (".png", ".jpg", ".jpeg") and picture.is_file():
                pdf.image(str(picture), x=10 + 65 * k, y=top, h=45)
        pdf.set_y(top + 47)
        finals = {r.cell_id: r for r in image.reviews}
        if image.morphometrics:
            pdf.multi_cell(0, 5, f"Morphometrics: {measures_line(image.morphometrics)}.",
                           new_x="LMARGIN", new_y="NEXT")
        if image.kind == "field" and not image.cells:
            pdf.multi_cell(0, 5, "No leukocyte was found in this field. " + _review_text(finals.get(None)),
                           new_x="LMARGIN", new_y="NEXT")
        for line in _differential_lines(image, finals):
            pdf.multi_cell(0, 5, line, new_x="LMARGIN", new_y="NEXT")
        cells = {cell.id: cell for cell in image.cells}
        for prediction in image.predictions:
            probabilities = ", ".join(f"{k} {v:.3f}" for k, v in prediction.probabilities.items())
            review = finals.get(prediction.cell_id)
            cell = cells.get(prediction.cell_id)
            where = (f"cell #{cell.index}" + (" (cut by the image border)" if cell.touches_border else "")
                     + (f", {measures_line(cell.morphometrics)}" if cell.morphometrics else "") + ": ") if cell else ""
            pdf.multi_cell(0, 5, f"{where}{prediction.label} (confidence {prediction.confidence:.3f}"
                           f"{', NEEDS REVIEW' if prediction.needs_review else ''}) by {prediction.model_id}; "
                           f"{probabilities}. {_review_text(review)}", new_x="LMARGIN", new_y="NEXT")
    if model_summaries:
        pdf.ln(3)
        pdf.set_font(REPORT_FONT, "B", 11)
        pdf.cell(0, 7, "Models", new_x="LMARGIN", new_y="NEXT")
        pdf.set_font(REPORT_FONT, "", 8)
        for model, summary in model_summaries.items():
            pdf.multi_cell(0, 4, f"{model}: {summary}", new_x="LMARGIN", new_y="NEXT")
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
