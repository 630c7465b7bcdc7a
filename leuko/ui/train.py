"""Widgets of the Train page: the training form, a live view of a job, and its evaluation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd
import streamlit as st

from leuko.config import OPTIMIZERS, TrainConfig
from leuko.jobs import Job, JobProgress, list_jobs, start_training
from leuko.modelstore import ModelIntegrityError, ModelNotFoundError, ModelStore, compare_with_default
from leuko.nets import ARCHITECTURES
from leuko.paths import REPO_ROOT, default_data_root
from leuko.preprocess import PreprocessConfig
from leuko.store import StoreUnavailableError
from leuko.tasks import TASKS
from leuko.ui import plain
from leuko.ui.auth import case_store, current_user
from leuko.ui.charts import confusion_heatmap, training_curves
from leuko.ui.models import make_default, may_change_default

PRESETS_DIR = REPO_ROOT / "configs"
DATA_SOURCES = ("Shared manifest", "Folder of class sub-folders", "Reviewed cases")


def presets(task: str) -> dict[str, TrainConfig]:
    """The shipped recipes (``configs/*.yaml``) for a task, by file stem."""
    found = {}
    for path in sorted(PRESETS_DIR.glob("*.yaml")):
        config = TrainConfig.from_yaml(path)
        if config.task == task:
            found[path.stem] = config
    return found


def _data_settings(task: str, source: str) -> dict | None:
    """Data fields of the configuration for the chosen source, or ``None`` if unusable."""
    if source == "Shared manifest":
        root = st.text_input("Folder holding manifest.csv", str(default_data_root()))
        if not (Path(root) / "manifest.csv").is_file():
            st.error(f"No manifest.csv in {root}.")
            return None
        return {"data_root": root, "folder": None}
    if source == "Folder of class sub-folders":
        folder = st.text_input("Folder (class sub-folders, or train/val/test each holding them)")
        if not folder or not Path(folder).is_dir():
            st.info("Give an existing folder.")
            return None
        return {"folder": folder, "data_root": None}
    st.caption("Single-cell crops of this task from signed-off cases, labelled with the reviewers' final labels, "
               "are copied into the training job's own folder (file names are digests; crops whose signed labels "
               "disagree are left out), split about 80/10/10 by digest, and deleted when the job ends.")
    return {"export_reviewed": True}


def _model_id_choice(task: str) -> tuple[str | None, bool] | None:
    """The typed model id (``None``: generated) and whether it replaces this task's model of
    that id; ``None`` while the id cannot be used: it is invalid, another task's model has it,
    or this task's has it and replacing that one is not ticked."""
    model_id = st.text_input("Model id (empty: generated)", key="train_model_id").strip()
    if not model_id:
        return None, False
    try:
        existing = ModelStore().check_new_id(model_id, task, replace=True)
    except ValueError as exc:
        st.error(plain(exc))
        return None
    if existing is None:
        return model_id, False
    if st.checkbox(f"Replace the existing model {model_id} (retrain it under its id)", key=f"replace_{model_id}"):
        return model_id, True
    st.caption(f"A {task} model {model_id} exists already: tick the box to replace it, or choose another id.")
    return None


def training_form() -> None:
    """Task, data, architecture, recipe preset and settings; starts a background job."""
    task = st.selectbox("Task", list(TASKS), format_func=lambda t: TASKS[t].title, key="train_task")
    source = st.radio("Data", DATA_SOURCES, horizontal=True)
    data = _data_settings(task, source)
    recipes = presets(task)
    preset_name = st.selectbox("Recipe preset", ["architecture defaults", *recipes])
    preset = recipes.get(preset_name) or TrainConfig(task=task, input_size=160, epochs=5, freeze_stages=2,
                                                     scheduler="cosine")
    id_choice = _model_id_choice(task)
    names = sorted(ARCHITECTURES)
    with st.form("train"):
        left, right = st.columns(2)
        arch = left.selectbox("Architecture", names, index=names.index(preset.arch))
        spec = ARCHITECTURES[arch]
        left.caption(f"{spec.source}; {'offline ImageNet weights' if spec.offline_weights else 'random initialisation'}")
        epochs = left.number_input("Epochs", 1, 200, preset.epochs)
        batch = left.number_input("Batch size", 1, 512, preset.batch_size)
        size = left.number_input("Input size (pixels)", 32, 600, preset.input_size or spec.input_size)
        optimizer = right.selectbox("Optimizer", OPTIMIZERS, index=OPTIMIZERS.index(preset.optimizer or spec.recipe.optimizer))
        lr = right.number_input("Learning rate", 1e-6, 1.0, preset.lr or spec.recipe.lr, format="%.6f")
        freeze = right.number_input("Frozen early stages", 0, 6, preset.freeze_stages)
        scheduler = right.selectbox("Schedule", ["cosine", "plateau"], index=["cosine", "plateau"].index(preset.scheduler))
        preprocess = preset.preprocess or PreprocessConfig()
        normalise = left.checkbox("Stain normalisation (Reinhard, to PBC's colours)",
                                  preprocess.stain_normalization == "reinhard",
                                  help="For cells from other labs' stains; applied in training and prediction.")
        colour = left.checkbox("Hue and grey-scale augmentation", preset.colour_invariance,
                               help="For cells from other labs' stains: jitters hue and saturation and turns a "
                                    "fifth of the training crops grey, so the model leans on shape and texture.")
        zoom = right.slider("Zoom augmentation (magnification factor)", 0.5, 3.0, preset.zoom_range or (1.0, 1.0),
                            step=0.1, help="1.0-1.0 keeps the default 0.7-1.0 area crop; a wider range teaches "
                                           "the model cells photographed at other magnifications.")
        view = right.slider("Network's view (zoom on the image centre)", 1.0, 2.0, float(preset.view_zoom), step=0.1,
                            help="Above 1 the network sees only the central part of each image, in training and "
                                 "prediction: a centred cell fills more of its input and of its Grad-CAM grid.")
        background = left.slider("Background replacement (share of training crops)", 0.0, 1.0,
                                 float(preset.background_replacement), step=0.1,
                                 help="Replaces the smear around the cell in this share of training crops, so "
                                      "the model learns from the cell, not from the lab's background. Crops "
                                      "without an annotated mask are segmented once first.")
        start = st.form_submit_button("Start training", type="primary", disabled=data is None or id_choice is None)
    if not start or data is None or id_choice is None:
        return
    model_id, replace = id_choice
    reviewed = data.pop("export_reviewed", False)
    stain = "reinhard" if normalise else "none"
    try:
        config = dataclasses.replace(
            preset, **data, task=task, arch=arch, epochs=int(epochs), batch_size=int(batch), input_size=int(size),
            optimizer=optimizer, lr=float(lr), freeze_stages=int(freeze), scheduler=scheduler, model_id=model_id,
            resume=False, preprocess=dataclasses.replace(preprocess, stain_normalization=stain),
            zoom_range=None if zoom == (1.0, 1.0) else zoom, colour_invariance=bool(colour), view_zoom=float(view),
            background_replacement=float(background))
        job = start_training(config, replace=replace, reviewed_cases=case_store() if reviewed else None)
    except StoreUnavailableError as exc:
        st.error(f"The case log is unavailable: {exc}. Training was not started; try again when it is back.")
        return
    except ValueError as exc:
        st.error(f"Training was not started: {exc}.")
        return
    st.session_state["train_job"] = job.id
    st.success(f"Training started (job {job.id}). It runs in the background; you can leave this page.")


def _job_choice() -> Job | None:
    jobs = list_jobs()
    if not jobs:
        st.caption("No training job yet.")
        return None
    ids = [j.id for j in jobs]
    current = st.session_state.get("train_job")
    index = ids.index(current) if current in ids else 0
    chosen = st.selectbox("Job", ids, index=index, format_func=lambda i: f"{i} ({jobs[ids.index(i)].state()})")
    return jobs[ids.index(chosen)]


@st.fragment(run_every=2.0)
def job_view() -> None:
    """The chosen job's state, progress, curves and log; refreshes itself every 2 s. Stopping or
    cancelling a job needs a signed-in user, read on each refresh."""
    job = _job_choice()
    if job is None:
        return
    user = current_user()
    state = job.state()
    progress = job.progress()
    st.progress(progress.fraction, text=_progress_text(job.id, state, progress))
    history = job.history()
    if history:
        st.plotly_chart(training_curves(history), key=f"curves_{job.id}_{len(history)}")
    if state == "running" and user is None:
        st.caption("Sign in (sidebar) to stop or cancel a training job.")
    elif state == "running":
        left, right = st.columns(2)
        if left.button("Stop (keep the best weights so far)"):
            job.stop()
        if right.button("Cancel (register nothing)"):
            job.kill()
    with st.expander("Log"):
        st.code(job.log_tail() or "(empty)")
    if state in ("finished", "stopped"):
        no_model = job.no_model_reason()
        if no_model:
            st.warning(f"{no_model[:1].upper()}{no_model[1:]}.")
        else:
            job_evaluation(job, user)
    elif state in ("failed", "interrupted", "cancelled"):
        st.error(f"The job {state}. The end of its log says why.")


def _duration(seconds: float) -> str:
    """``seconds`` as people say it: "40 s", "12 min", "1 h 05 min"."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def _progress_text(job_id: str, state: str, progress: JobProgress) -> str:
    """The progress bar's words: the job, its state and, while it trains, the epoch and the
    time left."""
    if state != "running":
        return f"{job_id}: {state}"
    if not progress.epochs:
        return f"{job_id}: starting"
    left = f", about {_duration(progress.eta_s)} left" if progress.eta_s is not None else ""
    return f"{job_id}: epoch {progress.epoch} of {progress.epochs}{left}"


def job_evaluation(job: Job, user: dict | None) -> None:
    """The registered model's test evaluation and, for a ``user`` who may change the default
    model (a signed-in reviewer or admin), a button to make it the task's default."""
    report_path = job.report_dir / "metrics.json"
    if not report_path.is_file():
        return
    report = json.loads(report_path.read_text())
    metrics = report["metrics"]
    st.markdown(f"**Registered model {report['model']}**: test accuracy {metrics['accuracy']:.3f}, "
                f"MCC {metrics['mcc']:.3f}, ECE {metrics['ece']:.3f} on {metrics['n']} images")
    st.dataframe(pd.DataFrame(metrics["per_class"]).T, width="content")
    left, right = st.columns(2)
    left.plotly_chart(confusion_heatmap(metrics["confusion_matrix"], metrics["classes"]), key=f"cm_{job.id}")
    right.image([str(job.report_dir / f"{name}.png") for name in ("roc", "pr", "reliability")], width=260)
    default_guard(report["model"], user, job.id)


def default_guard(model_id: str, user: dict | None, key: str) -> None:
    """The model beside its task's default on the test split, and "make it the default" for a
    ``user`` who may change it (:func:`may_change_default`): refused, with the reason, when the
    test sets differ or the model's is smaller; behind an explicit confirmation when the model
    is worse on any compared figure."""
    store = ModelStore()
    try:
        comparison = compare_with_default(store, model_id)
    except (ModelNotFoundError, ModelIntegrityError) as exc:
        st.error(f"The registered model cannot be compared with the default: {plain(exc)}")
        return
    if comparison.default is None:
        st.success(f"{plain(model_id)} is the default model for {comparison.model.task}.")
        return
    st.markdown(f"**Beside the current default {plain(comparison.default.id)}** (test split)")
    st.dataframe(pd.DataFrame(comparison.rows()), hide_index=True)
    if not may_change_default(user):
        st.caption("Sign in (sidebar) as a reviewer or admin to make it the default model for its task.")
        return
    if comparison.refusal:
        st.error(f"It cannot be made the default here: {plain(comparison.refusal)}.")
        return
    confirmed = True
    if comparison.worse:
        st.warning(f"This model is worse than the default on: {', '.join(comparison.worse).lower()}.")
        confirmed = st.checkbox("I have compared them and want this worse model as the default",
                                key=f"confirm_worse_{key}")
    if st.button("Make it the default model for its task", disabled=not confirmed):
        done, message = make_default(store, comparison.model.task, model_id)
        (st.success if done else st.error)(plain(message))
