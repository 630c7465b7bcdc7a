"""Models page: every installed model with its test figures and integrity check."""

import streamlit as st

from leuko.ui.status import model_status_table

st.title("Models")
table = model_status_table()
if table.empty:
    st.info("No model is installed yet.")
else:
    st.dataframe(table, hide_index=True, width="stretch")
