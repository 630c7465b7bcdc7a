"""Models page: every installed model with its test figures and integrity check."""

import streamlit as st

from leuko.ui.status import model_status_section

st.title("Models")
model_status_section()
