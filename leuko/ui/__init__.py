"""Helpers shared by the Streamlit pages; the only part of leuko allowed to import Streamlit."""
