"""Cases: browse the case log, review and reclassify, sign off, export, audit, agreement."""

import streamlit as st

from leuko.store import StoreUnavailableError
from leuko.ui.auth import case_store, current_user, login_section
from leuko.ui.cases import agreement_panel, case_detail, filters_form, history_table

login_section()
st.title("Cases")
user = current_user()
if user is None:
    st.info("Sign in (sidebar) to see the case log.")
    st.stop()
try:
    store = case_store()
    case_id = history_table(store, filters_form())
    if case_id is not None:
        case_detail(store, case_id, user)
    with st.expander("Agreement between models and reviewers"):
        agreement_panel(store)
except StoreUnavailableError as exc:
    st.error(f"The case log is unavailable: {exc}. Nothing was lost; reload when it is back.")
