"""Widgets of the Models page: each model's card, its figures and plots, default choice."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from leuko.jobs import find_report
from leuko.modelstore import ModelCard, ModelIntegrityError, ModelNotFoundError, ModelStore
from leuko.store.service import SIGNING_ROLES
from leuko.tasks import TASKS
from leuko.ui.charts import confusion_heatmap

HEADLINE = ("n", "accuracy", "balanced_accuracy", "f1_macro", "mcc", "roc_auc", "ece", "log_loss")


def card_section(card: ModelCard, store: ModelStore) -> None:
    """A model's card: data, figures, confusion matrix, ROC/PR/reliability, use and limits."""
    default = store.default_id(card.task) == card.id
    with st.expander(f"{card.id}{' (default)' if default else ''}", expanded=default):
        view = card.input_config.view_zoom
        seen = f" (the central {1 / view:.0%} of each side)" if view > 1 else ""
        st.markdown(f"**Architecture** {card.arch}, input {card.input.get('input_size')} px{seen}, "
                    f"weights {card.weights_dtype}, pretrained from {card.pretrained_source or 'nothing'}; "
                    f"trained in {(card.training_time_s or 0) / 60:.1f} min on {card.hardware or 'unknown hardware'}.")
        if card.task in TASKS:
            splits = {s: card.metrics[s] for s in ("val", "test") if isinstance(card.metrics.get(s), dict)}
            if splits:
                st.dataframe(pd.DataFrame({s: {k: m.get(k) for k in HEADLINE} for s, m in splits.items()}).T)
            threshold = f"{card.review_threshold:.3f}" if card.review_threshold else "none"
            st.markdown(f"**Calibration** temperature {card.temperature:.3f}; results below a confidence of "
                        f"{threshold} are marked needs-review "
                        f"({card.metrics.get('test_review_share', 0):.0%} of the test split).")
            test = splits.get("test")
            if test:
                left, right = st.columns([2, 3])
                left.plotly_chart(confusion_heatmap(test["confusion_matrix"], test["classes"], "test split"),
                                  key=f"cm_{card.id}")
                report = find_report(card.id)
                if report:
                    right.image([str(report / f"{n}.png") for n in ("roc", "pr", "reliability")
                                 if (report / f"{n}.png").is_file()], width=250)
        elif card.metrics:
            st.dataframe(pd.DataFrame(card.metrics.get("test", [])), hide_index=True)
        split_sizes = card.data.get("split_sizes")
        if split_sizes:
            st.markdown("**Data** " + str(card.data.get("source", "")))
            st.dataframe(pd.DataFrame(split_sizes).T)
        st.markdown(f"**Intended use** {card.intended_use}")
        st.markdown(f"**Limitations** {card.limitations}")


def may_change_default(user: dict | None) -> bool:
    """Whether ``user`` may choose a task's default model: like signing off a case, which the
    default model's results feed, it needs a signed-in reviewer or admin."""
    return user is not None and user.get("role") in SIGNING_ROLES


def make_default(store: ModelStore, task: str, model_id: str) -> tuple[bool, str]:
    """Make ``model_id`` the task's default: whether it was done, and the message saying so or
    why not (a model of another task, missing, or whose weights fail their check)."""
    try:
        store.set_default(task, model_id)
    except (ValueError, ModelIntegrityError, ModelNotFoundError) as exc:
        return False, f"{model_id} was not made the default: {exc}"
    return True, f"{model_id} is now the default for {task}."


def _choose_default(store: ModelStore, task: str, key: str) -> None:
    """The chooser's ``on_change``: write the model the user picked as the task's default."""
    st.session_state["default_outcome"] = make_default(store, task, st.session_state[key])


def default_chooser(store: ModelStore, user: dict | None) -> None:
    """Per task, choose the model the Analyze page and the CLI use by default; read-only
    unless ``user`` may change it (:func:`may_change_default`). Each chooser shows the default
    in effect on every rerun (another user may have changed it) and writes only when this
    user picks a model."""
    allowed = may_change_default(user)
    if not allowed:
        st.caption("Sign in (sidebar) as a reviewer or admin to change the default models.")
    outcome = st.session_state.pop("default_outcome", None)
    if outcome:
        (st.success if outcome[0] else st.error)(outcome[1])
    for task in [*TASKS, "segmentation"]:
        ids = [c.id for c in store.cards(task)]
        if len(ids) < 2:
            continue
        key = f"default_{task}"
        st.session_state[key] = store.default_id(task)
        st.selectbox(f"Default for {task}", ids, key=key, disabled=not allowed, on_change=_choose_default,
                     args=(store, task, key))
