"""Leuko's Streamlit entry point: the pages and their navigation (`streamlit run app.py`)."""

import streamlit as st

st.set_page_config(page_title="Leuko", page_icon="assets/leuko.svg", layout="wide")
navigation = st.navigation([
    st.Page("pages/0_Home.py", title="Home", icon=":material/home:", default=True),
    st.Page("pages/1_Analyze.py", title="Analyze", icon=":material/biotech:"),
    st.Page("pages/2_Cases.py", title="Cases", icon=":material/folder_open:"),
    st.Page("pages/3_Train.py", title="Train", icon=":material/model_training:"),
    st.Page("pages/4_Models.py", title="Models", icon=":material/deployed_code:"),
])
navigation.run()
