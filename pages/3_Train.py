"""Train: pick data, architecture and recipe, follow the run live, evaluate and register."""

import streamlit as st

from leuko.ui.auth import current_user, login_section
from leuko.ui.train import job_view, training_form

login_section()
st.title("Train")
st.caption("Training runs in its own process: leaving or reloading this page does not stop it. "
           "The finished model is calibrated on the validation split, evaluated once on the test split "
           "and registered in your models folder.")
if current_user() is None:
    st.info("Sign in (sidebar) to start training.")
else:
    with st.expander("New training run", expanded=True):
        training_form()
st.subheader("Training jobs")
job_view()
