"""Widgets of the Cases page: history table, case detail, review, sign-off, export, audit."""

from __future__ import annotations

import tempfile
from datetime import datetime, time, timezone
from pathlib import Path

import pandas as pd
import streamlit as st
from streamlit.delta_generator import DeltaGenerator

from leuko.analysis import png_bytes, saved_mask_overlay
from leuko.clinical import LABELS, UNITS, ClinicalValues, stored_flags
from leuko.store import (EXCLUDED_LABELS, NO_LEUKOCYTE, CaseFilter, CaseStore, PermissionDenied, StoreError,
                         StoreUnavailableError)
from leuko.store.export import case_pdf, cases_csv
from leuko.store.models import Case, ImageRecord
from leuko.store.summary import (case_summary, label_name, numbered_field, readable_measures, shift_text,
                                 shift_warning)
from leuko.tasks import TASKS, get_task
from leuko.ui import plain
from leuko.ui.charts import confusion_heatmap

PAGE_SIZE = 25


def plain_lines(text: str) -> str:
    """User-typed ``text`` shown as typed (:func:`plain`), its line breaks kept: markdown joins
    lines that end without two spaces."""
    return plain(text).replace("\n", "  \n")


def filters_form() -> CaseFilter:
    """History filters: reference, status, reviewer, task, predicted and final label, needs
    review, dates."""
    with st.expander("Filters", expanded=False):
        first, second, third = st.columns(3)
        reference = first.text_input("Reference contains")
        status = first.selectbox("Status", ["any", "new", "reviewed", "signed"])
        reviewer = first.text_input("Reviewed by", help="A reviewer's user name")
        task = second.selectbox("Task", ["any", *TASKS])
        labels = sorted({c for t in TASKS.values() for c in t.class_ids})
        predicted = second.selectbox("Predicted label", ["any", *labels])
        final = second.selectbox("Reviewed as", ["any", *labels, NO_LEUKOCYTE, *EXCLUDED_LABELS],
                                 help="The final label a reviewer confirmed or chose")
        needs_review = third.selectbox("Needs review", ["any", "yes", "no"])
        dates = third.date_input("Created between", value=(), help="Leave empty for any date; one date: that day")
    since = until = None
    if isinstance(dates, tuple) and dates:
        since = datetime.combine(dates[0], time.min, tzinfo=timezone.utc)
        until = datetime.combine(dates[-1], time.max, tzinfo=timezone.utc)
    return CaseFilter(since=since, until=until, task=None if task == "any" else task,
                      predicted_label=None if predicted == "any" else predicted,
                      final_label=None if final == "any" else final, reviewer=reviewer.strip() or None,
                      needs_review=None if needs_review == "any" else needs_review == "yes",
                      status=None if status == "any" else status, reference=reference.strip() or None)


def history_table(store: CaseStore, filters: CaseFilter) -> int | None:
    """One page of matching cases; returns the id of the case chosen to open."""
    page = st.session_state.get("cases_page", 1)
    rows, total = store.list_cases(filters, page=page, page_size=PAGE_SIZE)
    pages = max(1, -(-total // PAGE_SIZE))
    if page > pages:
        st.session_state["cases_page"] = page = 1
        rows, total = store.list_cases(filters, page=1, page_size=PAGE_SIZE)
    if not rows:
        st.info("No case matches. Cases are created on the Analyze page.")
        return None
    st.dataframe(pd.DataFrame(rows).drop(columns="id"), hide_index=True,
                 column_config={"needs_review": st.column_config.CheckboxColumn("needs review")})
    left, middle, right = st.columns([1, 2, 1])
    if left.button("Previous page", disabled=page <= 1):
        st.session_state["cases_page"] = page - 1
        st.rerun()
    middle.caption(f"Page {page} of {pages} ({total} case(s))")
    if right.button("Next page", disabled=page >= pages):
        st.session_state["cases_page"] = page + 1
        st.rerun()
    names = {r["id"]: f"{r['reference']} ({r['status']})" for r in rows}
    chosen = st.selectbox("Open case", list(names), format_func=names.get, key="open_case")
    st.download_button("Export the matching cases as CSV", lambda: cases_csv(store, filters), "leuko_cases.csv",
                       "text/csv", on_click="ignore")
    return chosen


def _image_bytes(store: CaseStore, relative: str | None) -> bytes | None:
    if not relative:
        return None
    path = store.files.path(relative)
    return path.read_bytes() if path.is_file() else None


@st.cache_data(max_entries=256, show_spinner=False)
def _cached_mask_overlay(original: Path, mask: Path) -> bytes:
    """A saved crop's mask overlay, drawn once: stored files are named by their content's
    digest, so the same paths always hold the same pictures. Raises ``FileNotFoundError``
    when it cannot be drawn, which is not cached, so a file that comes back is shown."""
    overlay = saved_mask_overlay(original, mask)
    if overlay is None:
        raise FileNotFoundError(f"no overlay of {original} with {mask}")
    return overlay


def _mask_overlay(original: Path, mask: Path) -> bytes | None:
    try:
        return _cached_mask_overlay(original, mask)
    except FileNotFoundError:
        return None


def _final_labels(image: ImageRecord) -> dict[int | None, str]:
    return {review.cell_id: review.final_label for review in image.reviews}


def review_image(store: CaseStore, image: ImageRecord, user: dict, locked: bool) -> None:
    """The image with its overlays and prediction, and the reviewer's confirm/reclassify
    controls: one choice for a crop, a gallery by predicted class for a field's cells."""
    finals = _final_labels(image)
    predictions = {p.cell_id: p for p in image.predictions}
    st.markdown(f"#### {plain(image.original_name)} ({image.kind}, {image.width}x{image.height})")
    whole = predictions.get(None)
    numbered = numbered_field(store, image) if image.cells else None
    pictures = [png_bytes(numbered) if numbered is not None else _image_bytes(store, image.stored_path)]
    captions = ["Cells found, numbered (red: flagged by the model)" if numbered is not None else "Original"]
    if whole:
        mask = store.files.path(whole.mask_path) if whole.mask_path else None
        pictures += [_image_bytes(store, whole.cam_path),
                     _mask_overlay(store.files.path(image.stored_path), mask) if mask else None]
        captions += ["Attention map (CAM)", "Nucleus / cytoplasm"]
    shown = [(p, c) for p, c in zip(pictures, captions) if p]
    st.image([p for p, _ in shown], caption=[c for _, c in shown], width=220 if image.kind == "crop" else 480)
    measured = ([{"Cell": "crop", **readable_measures(image.morphometrics)}] if image.morphometrics else
                [{"Cell": f"#{c.index}", "Cut by the image border": c.touches_border,
                  **readable_measures(c.morphometrics)} for c in image.cells if c.morphometrics])
    if measured:
        with st.expander("Morphometrics"):
            st.dataframe(pd.DataFrame(measured), hide_index=True)
    if image.kind == "field" and not image.cells:
        _empty_field_review(store, image, finals.get(None), user, locked)
        return
    if image.kind == "crop":
        if whole is None:
            st.caption("No prediction was stored for this image.")
            return
        task = get_task(whole.task)
        review_flag = " — needs review" if whole.needs_review else ""
        st.markdown(f"Model **{plain(whole.model_id)}**: {task.info(whole.label).display}, "
                    f"{whole.confidence:.0%}{review_flag}. Final: **{_final_text(task.id, finals.get(None))}**")
        _shift_line([whole])
        _review_form(store, image, [(None, whole.label, finals.get(None), whole.needs_review)], task, user, locked)
        return
    task = get_task(next(iter(predictions.values())).task)
    _shift_line(list(predictions.values()))
    by_class: dict[str, list] = {}
    for cell in image.cells:
        prediction = predictions.get(cell.id)
        by_class.setdefault(prediction.label if prediction else "unclassified", []).append((cell, prediction))
    items = []
    for label, cells in by_class.items():
        st.markdown(f"*{task.info(label).display if label in task.class_ids else label}* ({len(cells)})")
        crops = [_image_bytes(store, cell.crop_path) for cell, _ in cells]
        st.image([c for c in crops if c], width=110,
                 caption=[f"#{cell.index} {p.confidence:.0%}" + (" review" if p.needs_review else "")
                          + (" unfamiliar" if p.unfamiliar else "") + _final_caption(task.id, finals.get(cell.id))
                          if p else f"#{cell.index}" for (cell, p), c in zip(cells, crops) if c])
        items += [(cell.id, p.label if p else None, finals.get(cell.id), p is None or p.needs_review)
                  for cell, p in cells]
    _review_form(store, image, items, task, user, locked, {c.id: c.index for c in image.cells})


def _final_text(task_id: str, final: str | None) -> str:
    return "not reviewed" if final is None else label_name(task_id, final)


def _final_caption(task_id: str, final: str | None) -> str:
    return "" if final is None else f" → {label_name(task_id, final)}"


def _shift_line(predictions: list) -> None:
    """How unlike the model's training images the image (or its cells) looked: a warning
    when any result is unfamiliar, a caption with the scores otherwise; nothing when not
    measured."""
    measured = [(p, text) for p in predictions if (text := shift_text(p))]
    if not measured:
        return
    unfamiliar = [p for p, _ in measured if p.unfamiliar]
    if len(predictions) == 1:
        line = measured[0][1]
    else:
        scores = [p.shift_score for p, _ in measured if p.shift_score is not None]
        line = (f"{len(unfamiliar)} of {len(predictions)} cell(s) unfamiliar" if unfamiliar else "no cell unfamiliar") \
            + (f"; shift scores {min(scores):.2f}-{max(scores):.2f}" if scores else "")
        line += "".join(f"; {p.not_applicable}" for p, _ in measured if p.not_applicable)
    if unfamiliar:
        st.warning(shift_warning(plain(line)))
    else:
        st.caption(plain(line[:1].upper() + line[1:]) + ".")


def _empty_field_review(store: CaseStore, image: ImageRecord, final: str | None, user: dict, locked: bool) -> None:
    """A field in which no leukocyte was found: the reviewer confirms that, so the case can
    be signed, or re-analyses the image if a leukocyte was missed."""
    st.markdown(f"No leukocyte was found in this field. Final: **{final or 'not reviewed'}**")
    if locked or final == NO_LEUKOCYTE:
        return
    st.caption("If it does hold a leukocyte, analyse it again as single-cell crops.")
    if st.button("Confirm: no leukocyte in this field", key=f"empty_{image.id}"):
        _save_reviews(store, image, user, {None: NO_LEUKOCYTE}, "")


def _save_reviews(store: CaseStore, image: ImageRecord, user: dict, labels: dict[int | None, str],
                  comment: str) -> None:
    """Save the reviews, then say so once the page has been drawn again with them."""
    if not labels:
        return
    try:
        for cell_id, label in labels.items():
            store.review(image.id, user["name"], label, comment, cell_id=cell_id)
    except (StoreError, StoreUnavailableError) as exc:
        st.error(f"Review not saved: {plain(exc)}")
    else:
        st.session_state[f"review_saved_{image.id}"] = (
            f"Review saved: {len(labels)} label(s) of {plain(image.original_name)}.")
        st.rerun()


def _review_form(store: CaseStore, image: ImageRecord, items: list[tuple[int | None, str | None, str | None, bool]],
                 task, user: dict, locked: bool, numbers: dict[int, int] | None = None) -> None:
    """Final label per item (cell id or ``None`` for the image, predicted label, existing final
    label, needs review) and a comment; a field's cell may also be marked "not a leukocyte" or
    "duplicate". An item starts at its final label, else at the prediction; one the model
    flagged for review starts empty, so a person must choose it.
    Submitting saves only the items whose label is new or changed; a comment submitted
    without a change is saved with every chosen label, so it reaches the audit trail."""
    saved = st.session_state.pop(f"review_saved_{image.id}", None)
    if saved:
        st.success(saved)
    if locked:
        return
    with st.form(f"review_{image.id}"):
        columns = st.columns(min(4, len(items)))
        chosen = {}
        for position, (cell_id, predicted, final, needs_review) in enumerate(items):
            label = "Final label" if cell_id is None else f"Cell #{numbers[cell_id]}"
            options = task.class_ids if cell_id is None else [*task.class_ids, *EXCLUDED_LABELS]
            start = final if final in options else None if needs_review else predicted
            chosen[cell_id] = columns[position % len(columns)].selectbox(
                label + (" (flagged)" if needs_review and final is None else ""), options,
                index=options.index(start) if start in options else None,
                format_func=lambda c: label_name(task.id, c), placeholder="Choose", key=f"final_{image.id}_{cell_id}")
        comment = st.text_input("Comment", key=f"comment_{image.id}")
        if st.form_submit_button("Confirm or reclassify"):
            finals = {cell_id: final for cell_id, _, final, _ in items}
            undecided = sum(label is None for label in chosen.values())
            if undecided:
                st.session_state[f"review_notice_{image.id}"] = (
                    f"{undecided} flagged item(s) of {plain(image.original_name)} still need a label chosen by you.")
            changes = {c: label for c, label in chosen.items() if label is not None and label != finals[c]}
            if comment and not changes:
                changes = {c: label for c, label in chosen.items() if label is not None}
            _save_reviews(store, image, user, changes, comment)
    notice = st.session_state.pop(f"review_notice_{image.id}", None)
    if notice:
        st.warning(notice)


def case_detail(store: CaseStore, case_id: int, user: dict) -> None:
    """Everything about one case: header, clinical values, images with review, sign-off,
    PDF export and the audit trail."""
    case = store.case(case_id)
    signed = case.sign_off is not None
    st.subheader(f"Case {plain(case.reference)}: {case.status}")
    st.caption(f"Created by {plain(case.created_by)} at {case.created_at:%Y-%m-%d %H:%M} UTC"
               + (f"; signed by {plain(case.sign_off.signed_by)} at {case.sign_off.signed_at:%Y-%m-%d %H:%M} UTC"
                  if signed else ""))
    if case.notes:
        st.markdown(f"Notes: {plain_lines(case.notes)}")
    if case.clinical:
        values = ClinicalValues(**case.clinical)
        st.dataframe(pd.DataFrame([{f"{LABELS.get(k, k)} ({UNITS[k]})" if k in UNITS else LABELS.get(k, k): v
                                    for k, v in values.present().items()}]), hide_index=True)
        found, problem = stored_flags(values)
        if problem:
            st.warning(f"The blood count could not be checked: {problem}. The values are shown as saved.")
        for flag in found:
            st.warning(f"CBC: {flag.describe()}")
    summary_section(case)
    for image in case.images:
        review_image(store, image, user, signed)
    left, right = st.columns(2)
    if signed:
        left.markdown(f"Impression: {plain_lines(case.sign_off.impression) or 'none given'}")
    else:
        sign_off_form(store, case, user, left)
    right.download_button("Download PDF report", lambda: _pdf_bytes(store, case.id), f"{case.reference}.pdf",
                          "application/pdf", on_click="ignore")
    with st.expander("Audit trail"):
        events = store.audit_trail(case.id)
        st.dataframe(pd.DataFrame([{"at": e.at, "who": e.actor, "action": e.action, "entity": e.entity,
                                    "id": e.entity_id, "old": e.old, "new": e.new} for e in events]),
                     hide_index=True)


def summary_section(case: Case) -> None:
    """The case as a whole: the differential over all its images (cells reviewed as not a
    leukocyte or duplicate left out), blasts for the ALL tasks, where the blood count and the
    images disagree, and the shift warning."""
    summary = case_summary(case)
    warning = summary.shift_warning()
    if warning:
        st.warning(warning)
    for reason in summary.not_applicable:
        st.warning(f"For some cells the question does not apply: {plain(reason)}.")
    for task_id, labels in summary.labels.items():
        task = get_task(task_id)
        left_out = summary.left_out_text()
        st.markdown(f"**Case differential ({task.title})**: {len(labels)} cell(s) over all images, "
                    "reviewers' labels where given" + (f"; left out: {left_out}" if left_out else ""))
        st.dataframe(pd.DataFrame([{"Class": r["class"], "Cells": r["cells"], "%": round(r["percent"], 1)}
                                   for r in task.differential(labels)]), hide_index=True)
        blasts = task.blast_percent(labels)
        if blasts is not None:
            st.markdown(f"Blasts: {task.blast_count(labels)} of {len(labels)} cells ({blasts:.1f}%).")
    for finding in summary.findings:
        st.warning(f"Blood count and images disagree: {plain(finding)}")


def sign_off_form(store: CaseStore, case: Case, user: dict, where: DeltaGenerator) -> None:
    """The reviewer's impression and the sign-off button, in the column ``where``."""
    with where.form(f"sign_off_{case.id}"):
        impression = st.text_area("Impression", key=f"impression_{case.id}",
                                  help="Your reading of the case, printed on the report above your signature")
        if st.form_submit_button("Sign off this case", type="primary"):
            try:
                store.sign_off(case.id, user["name"], impression.strip())
            except (PermissionDenied, StoreError, StoreUnavailableError) as exc:
                st.error(plain(exc))
            else:
                st.rerun()


def _pdf_bytes(store: CaseStore, case_id: int) -> bytes:
    """The case's PDF report, built when the user downloads it."""
    with tempfile.TemporaryDirectory() as folder:
        return case_pdf(store, case_id, Path(folder) / "case.pdf").read_bytes()


def agreement_panel(store: CaseStore) -> None:
    """Agreement between each model's predictions and reviewers' final labels."""
    stats = store.agreement()
    if not stats:
        st.caption("No reviewed predictions yet.")
        return
    st.dataframe(pd.DataFrame([{"model": m, "reviewed": s["n"], "agreement": s["accuracy"], "Cohen's kappa": s["kappa"]}
                               for m, s in stats.items()]), hide_index=True)
    for model, values in stats.items():
        labels = list(values["confusion"])
        matrix = [[values["confusion"][p][f] for f in labels] for p in labels]
        st.plotly_chart(confusion_heatmap(matrix, labels, model, rows="model's label", columns="reviewer's final label"),
                        key=f"agreement_{model}")
