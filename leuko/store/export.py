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
from PIL import Image

from leuko.clinical import LABELS, UNITS, ClinicalValues, Range, reference_range, stored_flags
from leuko.images import ImageError, load_image
from leuko.store.models import Case, ImageRecord, Prediction, Review, as_utc
from leuko.store.service import CaseFilter, CaseStore
from leuko.store.summary import (CaseSummary, case_summary, label_name, measure_text, measures_line, numbered_field,
                                 pixel_size_um, readable_measures, shift_text)
from leuko.tasks import get_task

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


FIELD_MEASURES = ("cell_area_px", "nucleus_area_px", "nc_ratio", "nucleus_circularity", "nuclear_lobes",
                  "chromatin_contrast")
"""The morphometrics a field cell's row of the report gives (a crop's table gives them all)."""


REPORT_FONT = "DejaVu"
"""The report's font: DejaVu Sans, shipped with matplotlib, covers Greek, Cyrillic and the
symbols clinicians type (the PDF core fonts hold Latin-1 only and printed '?' for the rest)."""

LINE_MM = 4.5
"""Height of a line of body text in the report (millimetres)."""

FIELD_PICTURE_MM = 120.0
"""Largest height of a field picture (millimetres); smaller when the page's printable
height is less."""

CROP_PICTURE_MM = 45.0
"""Height of a crop's pictures (original, attention map), side by side (millimetres)."""


class CaseReport(FPDF):
    """An A4 case report with the Unicode font in its regular and bold styles, and a footer
    naming the case and the page; its layout helpers keep pictures whole on one page."""

    def __init__(self, reference: str) -> None:
        from matplotlib import font_manager

        super().__init__(format="A4")
        self.reference = reference
        for style, weight in (("", "normal"), ("B", "bold")):
            font = font_manager.FontProperties(family="DejaVu Sans", weight=weight)
            self.add_font(REPORT_FONT, style, font_manager.findfont(font, fallback_to_default=False))
        self.set_auto_page_break(True, margin=15)
        self.set_font(REPORT_FONT, "", 9)

    def footer(self) -> None:
        self.set_y(-12)
        self.set_font(REPORT_FONT, "", 7)
        self.cell(0, 5, f"Leuko case report {self.reference}, page {self.page_no()} of {{nb}}", align="C")

    @property
    def room_mm(self) -> float:
        """Height left above the bottom margin of the current page (millimetres)."""
        return self.page_break_trigger - self.get_y()

    @property
    def printable_mm(self) -> float:
        """Height between the top and bottom margins of a page (millimetres)."""
        return self.page_break_trigger - self.t_margin

    def heading(self, text: str, size: int = 12) -> None:
        """A bold heading, moved to the next page with the two lines that follow it."""
        if self.room_mm < 7 + 2 * LINE_MM:
            self.add_page()
        self.set_font(REPORT_FONT, "B", size)
        self.cell(0, 7, text, new_x="LMARGIN", new_y="NEXT")
        self.set_font(REPORT_FONT, "", 9)

    def paragraph(self, text: str) -> None:
        """A paragraph, wrapped, its line breaks kept."""
        self.multi_cell(0, LINE_MM, text, align="L", new_x="LMARGIN", new_y="NEXT")

    def rows(self, rows: list[list[str]], widths: tuple[float, ...], headings: bool = True) -> None:
        """A table of columns ``widths`` mm wide, left-aligned; with ``headings`` its first row
        is its heading, repeated on each page it spans."""
        with self.table(col_widths=widths, width=sum(widths), align="LEFT", text_align="LEFT", line_height=LINE_MM,
                        padding=0.8, first_row_as_headings=headings) as table:
            for row in rows:
                table.row([str(value) for value in row])
        self.ln(2)

    def pictures(self, images: list[Image.Image], height: float, title: str, caption: str = "",
                 keep_mm: float = 0.0) -> None:
        """A heading ``title`` over ``images`` side by side at ``height`` mm (smaller if the page
        width or height needs it), never cut by a page break nor parted from their title: a
        new page starts when they, and the ``keep_mm`` of text that belongs under them, do not
        fit what is left of this one."""
        gap = 3.0
        ratios = [image.width / image.height for image in images]
        around = 7 + (LINE_MM if caption else 0) + 2
        height = min(height, (self.epw - gap * (len(images) - 1)) / sum(ratios), self.printable_mm - around)
        if self.room_mm < height + around + min(keep_mm, self.printable_mm - height - around):
            self.add_page()
        self.heading(title, size=11)
        x, y = self.l_margin, self.get_y()
        for image, ratio in zip(images, ratios):
            self.image(image, x=x, y=y, h=height, w=height * ratio)
            x += height * ratio + gap
        self.set_y(y + height + 1)
        if caption:
            self.set_font(REPORT_FONT, "", 7)
            self.cell(0, LINE_MM, caption, new_x="LMARGIN", new_y="NEXT")
            self.set_font(REPORT_FONT, "", 9)
        self.ln(1)


def _when(moment) -> str:
    return f"{as_utc(moment):%Y-%m-%d %H:%M} UTC"


def _first_page(pdf: CaseReport, case: Case, summary: CaseSummary) -> None:
    """Summary, differential, blood count, findings, notes, impression and signature."""
    pdf.set_font(REPORT_FONT, "B", 16)
    pdf.cell(0, 10, f"Case report {case.reference}", new_x="LMARGIN", new_y="NEXT")
    pdf.set_font(REPORT_FONT, "", 8)
    pdf.paragraph(DISCLAIMER)
    pdf.ln(2)
    pdf.set_font(REPORT_FONT, "", 9)
    models = sorted({p.model_id for image in case.images for p in image.predictions})
    kinds = [image.kind for image in case.images]
    signed = case.sign_off
    pdf.rows([["Reference", case.reference],
              ["Images", f"{len(kinds)} ({kinds.count('crop')} single-cell crop(s), {kinds.count('field')} field(s))"],
              ["Analysed", f"{_when(case.created_at)} by {case.created_by}"],
              ["Model(s)", ", ".join(models) or "none"], ["Status", case.status],
              ["Signed", f"{_when(signed.signed_at)} by {signed.signed_by}" if signed else "not signed yet"]],
             (30, 160), headings=False)
    warning = summary.shift_warning()
    if warning:
        pdf.set_font(REPORT_FONT, "B", 9)
        pdf.paragraph(warning)
        pdf.set_font(REPORT_FONT, "", 9)
    for reason in summary.not_applicable:
        pdf.paragraph(f"For some cells the question does not apply: {reason}.")
    _differential(pdf, case, summary)
    _blood_count(pdf, case.clinical)
    pdf.heading("Findings")
    found, problem = stored_flags(ClinicalValues(**case.clinical)) if case.clinical else ([], None)
    lines = [f"Blood count: {flag.describe()}" for flag in found if flag.field is None]
    lines += [f"The blood count could not be checked: {problem}."] if problem else []
    lines += [f"Blood count against the images: {finding}" for finding in summary.findings]
    if not lines:
        lines = ["The blood count and the images agree." if case.clinical
                 else "No blood count was given, so none was compared with the images."]
    for line in lines:
        pdf.paragraph(f"\u2022 {line}")
    if case.notes:
        pdf.heading("Notes")
        pdf.paragraph(case.notes)
    pdf.heading("Reviewer's impression")
    pdf.paragraph((signed.impression or "None written.") if signed else "Not signed yet.")
    _signature(pdf, case)


def _differential(pdf: CaseReport, case: Case, summary: CaseSummary) -> None:
    """The case's differential per task over all images, and the blasts of the ALL tasks."""
    left_out = summary.left_out_text()
    for task_id, labels in summary.labels.items():
        task = get_task(task_id)
        pdf.heading(f"Differential over all images: {task.title}")
        pdf.paragraph(f"{len(labels)} cell(s) counted over {len(case.images)} image(s), with the reviewers' labels "
                      "where given" + (f"; left out: {left_out}" if left_out else "") + ".")
        pdf.rows([["Cell type", "Cells", "%"]] + [[r["class"], r["cells"], f"{r['percent']:.1f}"]
                                                  for r in task.differential(labels)], (70, 25, 25))
        blasts = task.blast_percent(labels)
        if blasts is not None:
            pdf.set_font(REPORT_FONT, "B", 9)
            pdf.paragraph(f"Blasts: {task.blast_count(labels)} of {len(labels)} cells ({blasts:.1f}%).")
            pdf.set_font(REPORT_FONT, "", 9)
    if not summary.labels:
        pdf.heading("Differential")
        pdf.paragraph("No leukocyte was counted in this case.")


def _blood_count(pdf: CaseReport, clinical: dict | None) -> None:
    """The blood count under human names, with units, reference ranges and flags."""
    pdf.heading("Blood count")
    if not clinical:
        pdf.paragraph("None given.")
        return
    values = ClinicalValues(**clinical)
    found, _ = stored_flags(values)
    named = {flag.field: flag.name for flag in found if flag.field}
    rows = [["Measure", "Value", "Unit", "Reference range", "Flag"]]
    for key, value in values.present().items():
        reference = reference_range(key, values.age, values.sex) if key in UNITS else None
        rows.append([LABELS.get(key, key), f"{value:g}" if isinstance(value, float) else value, UNITS.get(key, ""),
                     _range_text(reference), named.get(key, "")])
    pdf.rows(rows, (55, 25, 30, 40, 40))


def _range_text(reference: Range | None) -> str:
    """A reference range as printed: "4.5-13.5", or "0" when nothing is normal but none."""
    if reference is None:
        return ""
    return f"{reference.low:g}" if reference.low == reference.high else f"{reference.low:g}-{reference.high:g}"


def _signature(pdf: CaseReport, case: Case) -> None:
    """The signature block: who signed in the case log and when, and lines to sign by hand."""
    if pdf.room_mm < 30:
        pdf.add_page()
    pdf.heading("Signature")
    signed = case.sign_off
    pdf.paragraph(f"Signed in the case log by {signed.signed_by} on {_when(signed.signed_at)}." if signed
                  else "Not signed in the case log yet.")
    pdf.ln(6)
    pdf.paragraph("Name: ______________________________    Signature: ______________________________    "
                  "Date: ______________")


def _image_section(pdf: CaseReport, store: CaseStore, image: ImageRecord, number: int, total: int) -> None:
    """One image: its pictures (a field with its numbered cells) kept on one page with its
    title, then its results, reviews, shift scores and morphometrics."""
    title = f"Image {number} of {total}: {image.original_name} ({image.kind}, {image.width}x{image.height} px)"
    finals = {review.cell_id: review for review in image.reviews}
    predictions = {p.cell_id: p for p in image.predictions}
    whole = predictions.get(None)
    if image.cells:
        numbered = numbered_field(store, image)
        pictures = [Image.fromarray(numbered)] if numbered is not None else []
        height, caption = FIELD_PICTURE_MM, "Cells found, numbered as in the table below (red: flagged by the model)."
        keep = 3 * LINE_MM + 12
    else:
        pictures = []
        for relative in [image.stored_path] + ([whole.cam_path] if whole and whole.cam_path else []):
            try:
                pictures.append(load_image(store.files.path(relative)))
            except (ImageError, OSError):
                continue
        height, caption = CROP_PICTURE_MM, "The image" + (" and the model's attention map" if len(pictures) > 1
                                                          else "") + "."
        keep = 4 * LINE_MM + 6 * len(readable_measures(image.morphometrics or {}))
    if pictures:
        pdf.pictures(pictures, height, title, caption, keep)
    else:
        pdf.heading(title, size=11)
    if image.kind == "field" and not image.cells:
        pdf.paragraph("No leukocyte was found in this field. " + _review_text(None, finals.get(None)))
    elif image.kind == "crop" and whole is None:
        pdf.paragraph("No result was stored for this image.")
    elif image.kind == "crop":
        pdf.paragraph(f"{_result_text(whole)}; probabilities "
                      + ", ".join(f"{label_name(whole.task, k)} {v:.2f}" for k, v in whole.probabilities.items())
                      + f". {_review_text(whole.task, finals.get(None))}")
        shift = shift_text(whole)
        if shift:
            pdf.paragraph(f"Shift: {shift}.")
        if image.morphometrics:
            pdf.paragraph(_scale_note(image.morphometrics))
            pdf.rows([["Morphometric", "Value"]] + [[name, measure_text(value)] for name, value in
                                                    readable_measures(image.morphometrics).items()], (75, 25))
    else:
        _cell_table(pdf, image, predictions, finals)


def _cell_table(pdf: CaseReport, image: ImageRecord, predictions: dict, finals: dict) -> None:
    """A field's cells by number: the model's reading, the reviewer's label, the shift score
    and the main morphometrics."""
    measured = [cell.morphometrics for cell in image.cells if cell.morphometrics]
    if measured:
        pdf.paragraph(_scale_note(measured[0]))
    rows = [["Cell", "Model's reading", "Reviewer's label", "Shift", "Morphometrics"]]
    for cell in image.cells:
        prediction = predictions.get(cell.id)
        rows.append([f"{cell.index}" + (" (cut by the border)" if cell.touches_border else ""),
                     _result_text(prediction) if prediction else "not classified",
                     _review_text(prediction.task if prediction else None, finals.get(cell.id)),
                     (shift_text(prediction) or "not measured") if prediction else "",
                     measures_line(cell.morphometrics, FIELD_MEASURES) if cell.morphometrics else ""])
    pdf.rows(rows, (16, 38, 44, 30, 62))


def _scale_note(measures: dict) -> str:
    """The scale the image's sizes are given in."""
    scale = pixel_size_um(measures)
    return (f"Sizes in micrometres (pixel size {scale:.3f} µm)." if scale
            else "Sizes in pixels: no pixel size was given for this image.")


def _result_text(prediction: Prediction) -> str:
    """The model's reading: label, confidence and the review flag."""
    flag = ", needs review" if prediction.needs_review else ""
    return f"{label_name(prediction.task, prediction.label)} ({prediction.confidence:.0%} confidence{flag})"


def _review_text(task_id: str | None, review: Review | None) -> str:
    """A review as the report prints it: final label, reviewer and comment."""
    if review is None:
        return "Not reviewed yet."
    label = label_name(task_id, review.final_label) if task_id else review.final_label
    return f"Final: {label}, by {review.reviewer}" + (f" ({review.comment})" if review.comment else "") + "."


def case_pdf(store: CaseStore, case_id: int, path: Path, model_summaries: dict[str, str] | None = None) -> Path:
    """A one-case PDF a lab can file. Its first page sums the case up: reference, dates, who
    analysed and who signed, the differential over all images (cells reviewed as not a
    leukocyte or duplicate left out; blasts for the ALL tasks), the blood count with units,
    reference ranges and flags, where the count and the images disagree, notes, the reviewer's
    impression and a signature block. Each image follows, its pictures never cut by a page
    break (a field with its numbered cells), with results, reviews, shift scores and
    morphometrics; then the models' card summaries."""
    case = store.case(case_id)
    pdf = CaseReport(case.reference)
    pdf.add_page()
    _first_page(pdf, case, case_summary(case))
    pdf.add_page()
    for number, image in enumerate(case.images, start=1):
        _image_section(pdf, store, image, number, len(case.images))
        pdf.ln(3)
    if model_summaries:
        pdf.heading("Models")
        for model, summary in model_summaries.items():
            pdf.paragraph(f"{model}: {summary}")
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
