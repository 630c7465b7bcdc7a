"""Leuko home page: what the tool is, the state of its models and the device it runs on."""

import streamlit as st

from leuko.ui.auth import login_section
from leuko.ui.status import database_summary, model_status_section, runtime_summary

st.title("Leuko: acute leukemia screening support")
st.markdown(
    "Leuko gives a **second opinion** on peripheral blood smear images: ALL vs normal "
    "lymphocytes, B-ALL maturation subtype, and five-class white cell typing, with calibrated "
    "probabilities.\n\n"
    "It is **decision support, not a diagnosis**. Every result must be reviewed by a qualified "
    "person; a low-confidence result is flagged for review."
)
login_section()
st.subheader("Runtime")
st.markdown(runtime_summary())
st.markdown(database_summary())
st.subheader("Installed models")
model_status_section()
