"""Models: every installed model's card and figures, integrity, and the default per task."""

import streamlit as st

from leuko.modelstore import ModelStore
from leuko.ui.auth import current_user, login_section
from leuko.ui.models import card_section, default_chooser
from leuko.ui.status import model_status_section

login_section()
st.title("Models")
model_status_section()
store = ModelStore()
st.subheader("Default model per task")
default_chooser(store, current_user())
st.subheader("Model cards")
for card in store.cards():
    card_section(card, store)
