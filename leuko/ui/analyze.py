"""Widgets of the Analyze page: settings, CBC form, image inputs, results, saving a case."""

from __future__ import annotations

import hashlib
import logging
import secrets
from dataclasses import dataclass, fields
from datetime import datetime
from time import perf_counter

import numpy as np
import pandas as pd
import streamlit as st

from leuko.analysis import (AnalysisSettings, Analyzer, CaseAnalysis, ImageAnalysis, boxes_overlay, mask_overlay,
                            percent, shift_lines)
from leuko.clinical import (CONVERSIONS, LABELS, UNITS, ClinicalValueError, ClinicalValues, convert, likely_unit_slip,
                             validate)
from leuko.device import DeviceError
from leuko.examples import PUBLIC_DATASETS, examples_root, find_examples
from leuko.explain import CAM_METHODS
from leuko.images import IMAGE_SUFFIXES, ImageError
from leuko.modelstore import ModelIntegrityError, ModelNotFoundError, ModelStore
from leuko.segment import chosen_segmenter, segmenter_weights
from leuko.store import REFERENCE_MAX_CHARS, StoreError, StoreUnavailableError
from leuko.store.summary import readable_measures
from leuko.tasks import TASKS
from leuko.ui import plain
from leuko.ui.auth import case_store, current_user
from leuko.ui.charts import probability_bars, recall_bars

log = logging.getLogger(__name__)

UPLOAD_TYPES = [suffix.lstrip(".") for suffix in IMAGE_SUFFIXES]

DETAILS_SHOWN = 3
"""Images whose details are shown open below the case summary; the rest are collapsed (a
crop's details are about 950 px tall, so nine crops made a 9,000 px page)."""


@dataclass
class RunOptions:
    """Per-run choices that do not need another model load."""

    cam_method: str = "gradcam"
    kind: str = "auto"
    pixel_size_um: float | None = None
    auto_save: bool = False


@st.cache_resource(max_entries=4, show_spinner="Loading the model...")
def analyzer_for(task: str, model_id: str | None, device: str, segmenter: str, weights: str,
                 segmenter_id: str | None, segmenter_digest: str) -> Analyzer:
    """One analyzer (classifier, CAM object, segmenter) per choice, shared by all sessions.
    ``weights``, ``segmenter_id`` and ``segmenter_digest`` (the classifier's weights digest,
    the learned segmenter's id and digest, ``classical`` for the classical segmenter) key the
    cache too, so a model retrained under the same id, or another segmentation default, is
    loaded afresh instead of serving the old weights."""
    return Analyzer(AnalysisSettings(task, model_id, None if device == "auto" else device, segmenter))


def settings_sidebar() -> tuple[AnalysisSettings, RunOptions]:
    """Task, model, CAM method, device, segmenter, image kind and pixel size, in the sidebar."""
    with st.sidebar:
        st.header("Analysis settings")
        task = st.selectbox("Task", list(TASKS), format_func=lambda t: TASKS[t].title)
        store = ModelStore()
        cards = store.cards(task)
        try:
            default = store.default_id(task)
        except ModelNotFoundError:
            default = None
        ids = sorted((c.id for c in cards), key=lambda i: i != default)
        model = st.selectbox("Model", ids or ["(none installed)"],
                             format_func=lambda i: f"{i} (default)" if i == default else i)
        cam = st.selectbox("Explanation", list(CAM_METHODS), help="ScoreCAM is much slower than the others.")
        device = st.selectbox("Device", ["auto", "cpu", "cuda"], help="auto: the GPU when there is one")
        segmenter = st.selectbox("Segmenter", ["auto", "learned", "classical"],
                                 help="auto: whichever scored the higher Dice on the validation masks")
        kind = st.selectbox("Image kind", ["auto", "crop", "field"],
                            help="auto: images at least 600 px on the longer side are fields of view")
        pixel = st.number_input("Pixel size (micrometres per pixel)", min_value=0.0, max_value=10.0, value=None,
                                step=0.01, help="Optional; gives areas in square micrometres")
        auto_save = st.checkbox("Save each analysis as a case automatically", value=False)
    settings = AnalysisSettings(task, model if ids else None, device, segmenter)
    return settings, RunOptions(cam, kind, pixel or None, auto_save)


def cbc_form() -> tuple[ClinicalValues | None, str | None]:
    """Optional CBC and clinical values, each with its unit beside it. Returns the validated
    values (``None`` when nothing was entered) and, when values are impossible, every
    message at once (``None`` when they are accepted)."""
    with st.expander("CBC and clinical values (optional)"):
        entered: dict = {}
        columns = st.columns(3)
        for position, item in enumerate(fields(ClinicalValues)):
            column = columns[position % 3]
            name = item.name
            if name == "sex":
                sex = column.selectbox("Sex", ["not given", "female", "male"])
                if sex != "not given":
                    entered["sex"] = sex
                continue
            units = list(CONVERSIONS.get(name, {UNITS[name]: 1.0}))
            if len(units) > 1:
                number, choice = column.columns([3, 2])
                value = number.number_input(LABELS[name], value=None, step=0.1, format="%g", key=f"cbc_{name}")
                unit = choice.selectbox("Unit", units, key=f"unit_{name}", help=f"Unit of {LABELS[name]}")
            else:
                unit = units[0]
                label = LABELS[name] if LABELS[name].endswith(unit) else f"{LABELS[name]} ({unit})"
                value = column.number_input(label, value=None, step=0.1, format="%g", key=f"cbc_{name}")
            if value is not None:
                entered[name] = (float(value), unit)
                slip = likely_unit_slip(name, float(value), unit)
                if slip:
                    column.warning(f"{LABELS[name]}: {slip}")
        if not entered:
            return None, None
        values, problems = checked_values(entered)
        for problem in problems:
            st.error(f"{LABELS.get(problem.field, problem.field)}: {problem.reason}")
        if problems:
            return None, "; ".join(str(problem) for problem in problems)
        st.caption("Values accepted.")
        return values, None


def checked_values(entered: dict) -> tuple[ClinicalValues | None, list[ClinicalValueError]]:
    """The values typed in the form (field: (value, unit), or the sex) converted to the
    schema's units and validated, or every problem found: each field's own (unit, range)
    first, all at once, and the checks across fields only when each field passes alone."""
    converted, problems = {}, []
    for name, given in entered.items():
        try:
            converted[name] = convert(name, *given) if name != "sex" else given
            validate(ClinicalValues(**{name: converted[name]}))
        except ClinicalValueError as exc:
            problems.append(exc)
    if problems:
        return None, problems
    try:
        return validate(ClinicalValues(**converted)), []
    except ClinicalValueError as exc:
        return None, [exc]


def image_inputs(task: str) -> list[tuple[str, bytes]]:
    """Uploaded images and chosen examples, as (file name, bytes)."""
    uploads = st.file_uploader("Smear images: single-cell crops or whole fields of view", type=UPLOAD_TYPES,
                               accept_multiple_files=True)
    items = [(u.name, u.getvalue()) for u in uploads or []]
    root = examples_root()
    with st.expander("Example images"):
        if root is None:
            st.info("No example folder is configured. Set LEUKO_EXAMPLES to a folder of images (class "
                    f"sub-folders or a manifest.csv). Public data for these tasks: {PUBLIC_DATASETS}.")
        else:
            examples = {e.title: e for e in find_examples(task, root, per_class=12)}
            chosen = st.multiselect(f"Examples from {root}", list(examples))
            items += [(examples[title].path.name, examples[title].path.read_bytes()) for title in chosen]
    return items


def load_analyzer(settings: AnalysisSettings) -> Analyzer | None:
    """The chosen model, loaded as soon as it is chosen (before any upload), or ``None``
    with the reason shown when it cannot be loaded."""
    try:
        store = ModelStore()
        model_id = settings.model_id or store.default_id(settings.task)
        weights = store.locate(model_id)[0].weights_sha256
        segmenter = chosen_segmenter(settings.segmenter)
        return analyzer_for(settings.task, model_id, settings.device or "auto", settings.segmenter, weights,
                            segmenter.id if segmenter else None, segmenter_weights(segmenter))
    except (ModelNotFoundError, ModelIntegrityError, DeviceError) as exc:
        st.error(f"The model could not be loaded: {exc}")
        return None


def model_summary(analyzer: Analyzer) -> None:
    """The chosen model's test figures, so a user knows how far to trust it before uploading."""
    card = analyzer.predictor.card
    test = card.metrics.get("test")
    if not isinstance(test, dict):
        return
    with st.expander(f"About {card.id}: test accuracy {test['accuracy']:.1%} on {test['n']} images"):
        st.plotly_chart(recall_bars(analyzer.predictor.task, test["per_class"]), key="model_recall")
        view = card.input_config.view_zoom
        seen = (f" The model sees the central {1 / view:.0%} of each side of a crop, so its attention map is "
                "empty around that square." if view > 1 else "")
        st.caption(f"{card.limitations} Results below {analyzer.predictor.review_confidence:.0%} confidence "
                   f"are marked needs-review.{seen}")


def inputs_signature(analyzer: Analyzer | None, settings: AnalysisSettings, options: RunOptions,
                     items: list[tuple[str, bytes]], clinical: ClinicalValues | None, clinical_error: str | None) -> str:
    """A digest of everything a run's results depend on: the models' weights, task, device,
    segmenter, CAM method, image kind, pixel size, blood count (or the message refusing it)
    and the images. Results whose signature differs from the page's current one are stale and
    are not saved."""
    digest = hashlib.sha256(repr((analyzer.weights if analyzer else None, settings, options.cam_method, options.kind,
                                  options.pixel_size_um, clinical, clinical_error)).encode())
    for name, data in items:
        digest.update(name.encode())
        digest.update(hashlib.sha256(data).digest())
    return digest.hexdigest()


def run_analyses(analyzer: Analyzer, options: RunOptions, items: list[tuple[str, bytes]],
                 clinical: ClinicalValues | None, signature: str) -> None:
    """Analyse every image with a progress bar; results, per-file errors and the inputs'
    ``signature`` (:func:`inputs_signature`) go to the session."""
    results, errors = [], []
    started = perf_counter()
    bar = st.progress(0.0, text="Analysing...")
    for done, (name, data) in enumerate(items, start=1):
        try:
            results.append((analyzer.analyze(data, name, clinical, cam_method=options.cam_method, kind=options.kind,
                                             pixel_size_um=options.pixel_size_um), data))
        except ImageError as exc:
            errors.append(f"{name}: {exc}")
        except Exception as exc:
            log.exception("analysing %s failed", name)
            errors.append(f"{name}: not analysed because of an internal error ({type(exc).__name__}: {exc}); "
                          "the other images were analysed. Please report it with the image.")
        bar.progress(done / len(items), text=f"Analysed {done} of {len(items)}")
    bar.empty()
    st.session_state["analyses"] = results
    st.session_state["analysis_errors"] = errors
    st.session_state["analysis_clinical"] = clinical
    st.session_state["analysis_signature"] = signature
    run = st.session_state.get("analysis_run", (0, ""))[0] + 1
    st.session_state["analysis_run"] = (run, f"Run {run}: {len(results)} image(s) analysed in "
                                             f"{perf_counter() - started:.2f} s ({analyzer.runtime}).")
    st.session_state.pop("saved_case", None)
    if options.auto_save and results:
        save_case(new_reference(), "")


def review_badge(needs_review: bool) -> str:
    """The badge beside a result: red "Needs review" whenever any warning applies."""
    return ":red-badge[Needs review]" if needs_review else ":green-badge[Confident]"


def differential_table(rows: list[dict]) -> None:
    """A differential (:meth:`leuko.tasks.Task.differential` rows) with percentages to one decimal."""
    frame = pd.DataFrame(rows).assign(percent=lambda f: f["percent"].round(1))
    st.dataframe(frame, hide_index=True, column_config={"percent": st.column_config.NumberColumn(format="%.1f%%")})


def results_section(analyses: list[ImageAnalysis], clinical: ClinicalValues | None) -> None:
    """A run's results: the case summary first, then each image's details, the first
    :data:`DETAILS_SHOWN` open and the rest collapsed."""
    case_section(CaseAnalysis(analyses, clinical))
    for number, analysis in enumerate(analyses):
        if number < DETAILS_SHOWN:
            show_analysis(analysis, str(number))
            continue
        review = "needs review" if analysis.needs_review else "confident"
        with st.expander(f"{plain(analysis.name)}: {len(analysis.cells)} cell(s), {review}"):
            show_analysis(analysis, str(number))


def case_section(case: CaseAnalysis) -> None:
    """The run as one case: a table of every cell of every image, the differential over all
    of them, the blood count compared with it, and images unlike the model's training images."""
    st.header("Case summary")
    for line in shift_lines(case.cells):
        st.warning(line)
    st.dataframe(pd.DataFrame(case.rows()).astype({"cell": "Int64"}), hide_index=True,
                 column_config={"confidence (%)": st.column_config.NumberColumn(format="%.1f%%")})
    if len(case.images) > 1 and case.cells:
        st.markdown(f"**Differential over all {len(case.cells)} cells**")
        differential_table(case.differential())
    summary = case.summary()
    (st.warning if case.needs_review else st.success)(summary)


def show_analysis(analysis: ImageAnalysis, key: str) -> None:
    """One image's result: label, badge, probabilities, overlays, morphometrics, summary."""
    st.subheader(plain(analysis.name))
    if not analysis.cells:
        st.warning(analysis.summary())
        return
    for line in shift_lines(analysis.cells):
        st.warning(line)
    opacity = st.slider("Overlay opacity", 0.0, 1.0, 0.45, 0.05, key=f"opacity_{key}")
    if analysis.kind == "crop":
        cell = analysis.cells[0]
        info = analysis.task.info(cell.prediction.label)
        st.markdown(f"### {info.display} — {percent(cell.prediction.confidence)} {review_badge(cell.needs_review)}")
        left, right = st.columns([2, 3])
        left.plotly_chart(probability_bars(analysis.task, cell.prediction.as_dict(), analysis.review_threshold),
                          key=f"p_{key}")
        contours = right.checkbox("Draw the segmentation contour on the attention map", key=f"contour_{key}")
        images = [analysis.rgb, cell.cam_overlay(opacity, contours), mask_overlay(cell.crop, cell.mask, opacity)]
        right.image(images, caption=["Original", f"{analysis.cam_method} for {info.display}", "Nucleus / cytoplasm"],
                    width=200)
    else:
        st.markdown(f"### Field of view: {len(analysis.cells)} white cell(s)")
        left, right = st.columns(2)
        left.image(boxes_overlay(analysis), caption="Cells found (red: needs review)")
        right.image(mask_overlay(analysis.rgb, analysis.mask, opacity), caption="Nucleus / cytoplasm")
        st.markdown("**Differential count**")
        differential_table(analysis.differential())
        st.markdown("**Cells by predicted class** (each cell, then where the model looked)")
        for info in analysis.task.classes:
            group = [c for c in analysis.cells if c.prediction.label == info.id]
            if group:
                st.markdown(f"*{info.display}* ({len(group)})")
                st.image([np.hstack([c.crop, c.cam_overlay(opacity)]) for c in group], width=220,
                         caption=[f"#{c.index} {percent(c.prediction.confidence)}"
                                  + (" review" if c.needs_review else "") for c in group])
    with st.expander("Morphometrics"):
        st.dataframe(pd.DataFrame([{"cell": c.index, "label": analysis.task.info(c.prediction.label).display,
                                    "cut by the border": c.touches_border, **readable_measures(c.morphometrics or {})}
                                   for c in analysis.cells]), hide_index=True)
    st.info(analysis.summary())


def new_reference() -> str:
    """A case reference from the time and six random hex digits, so two saves in the same
    second (two users, or automatic saving) do not collide."""
    return f"CASE-{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def save_case(reference: str, notes: str) -> None:
    """Log the session's analyses as one case under the signed-in user; on failure the
    analyses stay in the session so saving can be retried."""
    user = current_user()
    if user is None:
        st.warning("Sign in (sidebar) to save cases.")
        return
    results = st.session_state.get("analyses", [])
    clinical = st.session_state.get("analysis_clinical")
    try:
        entries = [analysis.to_entry(data) for analysis, data in results]
        disagrees = bool(CaseAnalysis([analysis for analysis, _ in results], clinical).findings())
        case_id = case_store().save_case(reference, user["name"], entries, notes,
                                         clinical.present() if clinical else None, disagrees)
    except (StoreError, StoreUnavailableError) as exc:
        st.error(f"The case was not saved: {plain(exc)}. Your results are kept; try again.")
        return
    st.session_state["saved_case"] = (case_id, reference)
    st.session_state.pop("suggested_reference", None)


def save_section(signature: str) -> None:
    """The save form, or the saved case's reference; no form while the results are stale
    (the task, model, settings, blood count or images changed since they were computed)."""
    saved = st.session_state.get("saved_case")
    if saved:
        st.success(f"Saved as case {plain(saved[1])} (id {saved[0]}). Review it on the Cases page.")
        return
    if st.session_state.get("analysis_signature") != signature:
        st.warning("The task, model, settings, blood count or images changed since these results were computed: "
                   "they describe the earlier inputs. Analyse again to save a case.")
        return
    with st.form("save_case"):
        suggested = st.session_state.setdefault("suggested_reference", new_reference())
        reference = st.text_input("Case reference (pseudonymous; never a patient name)", value=suggested,
                                  max_chars=REFERENCE_MAX_CHARS)
        notes = st.text_area("Notes")
        if st.form_submit_button("Save as case"):
            save_case(reference, notes)
            if "saved_case" in st.session_state:
                st.rerun()
