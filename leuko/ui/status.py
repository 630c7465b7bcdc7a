"""Model and runtime status for the home and models pages."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from leuko.device import describe_device, pick_device
from leuko.modelstore import ModelStore
from leuko.onnx_backend import RUNTIME_NAMES, choose_runtime


def runtime_summary() -> str:
    """Where the networks will run, in words: the device and, on the CPU, the exported runtime."""
    device = pick_device(None)
    runtime = choose_runtime("auto", device)
    engine = f", through {RUNTIME_NAMES[runtime]}" if runtime else ""
    return f"Models run on: {describe_device(device)}{engine}"


def database_summary() -> str:
    """Which database the case log uses and how many cases it holds, or why it is unreachable."""
    from leuko.store import StoreUnavailableError
    from leuko.ui.auth import case_store

    try:
        store = case_store()
        total = store.list_cases(page_size=1)[1]
    except StoreUnavailableError as exc:
        return f"Case log unavailable: {exc}. Analyses can still be run; nothing is saved until it is back."
    kind = store.engine.dialect.name
    return f"Case log: {'SQLite' if kind == 'sqlite' else kind.capitalize()} database, {total} case(s)"


def model_status_table(store: ModelStore | None = None) -> pd.DataFrame:
    """One row per installed model (task, architecture, test accuracy, integrity, default), and
    one per card file that cannot be read, so a damaged card is seen instead of missing."""
    store = store or ModelStore()
    rows = [{"model": path.name, "integrity": f"refused: {why}"} for path, why in store.unreadable_cards()]
    for entry in store.status():
        card = entry.card
        test = card.metrics.get("test") if isinstance(card.metrics.get("test"), dict) else {}
        rows.append({"model": card.id, "task": card.task, "architecture": card.arch,
                     "test accuracy": test.get("accuracy"), "test MCC": test.get("mcc"), "default": entry.default,
                     "integrity": "ok" if entry.problem is None else f"refused: {entry.problem}"})
    return pd.DataFrame(rows)


def model_status_section() -> None:
    """The installed models as a table, or how to get one when there is none."""
    table = model_status_table()
    if table.empty:
        st.info("No model is installed yet. Train one with `python -m leuko train --task all_binary`.")
    else:
        st.dataframe(table, hide_index=True, width="stretch")
