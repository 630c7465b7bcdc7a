"""Sign-in against the case log's local accounts, kept in the Streamlit session."""

from __future__ import annotations

import os
import time
from pathlib import Path

import streamlit as st

from leuko.paths import leuko_home
from leuko.store import CaseStore, PermissionDenied, StoreUnavailableError
from leuko.ui import plain

SESSION_SECONDS = 8 * 3600
"""A sign-in lasts one working shift; after that the user signs in again."""


@st.cache_resource
def _store_for(home: str, url: str) -> CaseStore:
    return CaseStore(url=url or None, home=Path(home))


def case_store() -> CaseStore:
    """One store per app process and database; creating it upgrades the schema."""
    return _store_for(str(leuko_home()), os.environ.get("LEUKO_DB_URL", ""))


def current_user() -> dict | None:
    """The signed-in user (name and role), or ``None`` once the sign-in has expired, which
    forgets the session as signing out does."""
    user = st.session_state.get("user")
    if user and time.time() - user["since"] > SESSION_SECONDS:
        _forget_session()
        return None
    return user


def _forget_session() -> None:
    """Drop everything the session holds (the user, results, their blood count, the save
    form's state), so the next person at the workstation cannot save the previous one's
    analyses under their own name. Widget values the browser still shows (chosen images,
    typed counts) stay visible to them."""
    st.session_state.clear()


def login_section() -> None:
    """Sidebar sign-in form, or the signed-in user with a sign-out button (which forgets the
    session: :func:`_forget_session`)."""
    with st.sidebar:
        user = current_user()
        if user:
            st.markdown(f"Signed in as **{plain(user['name'])}** ({user['role']})")
            if st.button("Sign out"):
                _forget_session()
                st.rerun()
            return
        with st.form("login"):
            name = st.text_input("User name")
            password = st.text_input("Password", type="password")
            submitted = st.form_submit_button("Sign in")
        if submitted:
            try:
                account = case_store().authenticate(name, password)
            except (PermissionDenied, StoreUnavailableError) as exc:
                st.error(str(exc))
            else:
                st.session_state["user"] = {"name": account.username, "role": account.role, "since": time.time()}
                st.rerun()
