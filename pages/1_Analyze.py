"""Analyze: upload smear images (and optionally a CBC), get calibrated results with
explanations, segmentation and morphometrics, and save them as a case."""

import streamlit as st

from leuko.tasks import get_task
from leuko.ui import plain
from leuko.ui.analyze import (cbc_form, image_inputs, inputs_signature, load_analyzer, model_summary, results_section,
                              run_analyses, save_section, settings_sidebar)
from leuko.ui.auth import login_section

login_section()
st.title("Analyze")
settings, options = settings_sidebar()
analyzer = load_analyzer(settings)
st.caption(get_task(settings.task).description + " Decision support, not a diagnosis.")
if analyzer is not None:
    model_summary(analyzer)
clinical, clinical_error = cbc_form()
items = image_inputs(settings.task)
signature = inputs_signature(analyzer, settings, options, items, clinical, clinical_error)
if st.button("Analyze", type="primary", disabled=not items or clinical_error is not None or analyzer is None):
    run_analyses(analyzer, options, items, clinical, signature)
for message in st.session_state.get("analysis_errors", []):
    st.error(f"Not analysed: {plain(message)}")
analyses = st.session_state.get("analyses", [])
if analyses:
    st.caption(st.session_state["analysis_run"][1])
    results_section([analysis for analysis, _ in analyses], st.session_state["analysis_clinical"])
    save_section(signature)
