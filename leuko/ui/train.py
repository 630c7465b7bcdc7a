"""Widgets of the Train page: the training form, a live view of a job, and its evaluation."""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import streamlit as st

from leuko.config import OPTIMIZERS, TrainConfig
from leuko.jobs import Job, list_jobs, start_training
from leuko.modelstore import ModelStore
from leuko.nets import ARCHITECTURES
from leuko.paths import REPO_ROOT, default_data_root
from leuko.preprocess import PreprocessConfig
from leuko.store.export import export_dataset
from leuko.tasks import TASKS
from leuko.ui.auth import case_store
from leuko.ui.charts import confusion_heatmap, training_curves

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
               "are exported (file names are digests; crops whose signed labels disagree are left out) and "
               "split about 80/10/10 by digest.")
    return {"export_reviewed": True}


def training_form() -> None:
    """Task, data, architecture, recipe preset and settings; starts a background job."""
    task = st.selectbox("Task", list(TASKS), format_func=lambda t: TASKS[t].title, key="train_task")
    source = st.radio("Data", DATA_SOURCES, horizontal=True)
    data = _data_settings(task, source)
    recipes = presets(task)
    preset_name = st.selectbox("Recipe preset", ["architecture defaults", *recipes])
    preset = recipes.get(preset_name) or TrainConfig(task=task, input_size=160, epochs=5, freeze_stages=2,
                                                     scheduler="cosine")
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
        model_id = right.text_input("Model id (empty: generated)")
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
        start = st.form_submit_button("Start training", type="primary", disabled=data is None)
    if not start or data is None:
        return
    if data.pop("export_reviewed", False):
        folder = Path(tempfile.mkdtemp(prefix="leuko-reviewed-"))
        manifest = export_dataset(case_store(), folder, task)
        if len(manifest.read_text().splitlines()) < 12:
            st.error("Fewer than ten crops of this task in signed-off cases: review and sign more cases "
                     "before training on them.")
            return
        data = {"data_root": str(folder), "folder": None}
    settings = {**preset.to_dict(), **data, "task": task, "arch": arch, "epochs": int(epochs),
                "batch_size": int(batch), "input_size": int(size), "optimizer": optimizer, "lr": float(lr),
                "freeze_stages": int(freeze), "scheduler": scheduler, "model_id": model_id or None, "resume": False,
                "preprocess": {**asdict(preprocess), "stain_normalization": "reinhard" if normalise else "none"},
                "zoom_range": None if zoom == (1.0, 1.0) else zoom, "colour_invariance": bool(colour),
                "view_zoom": float(view),
                "background_replacement": float(background)}
    job = start_training(TrainConfig.from_dict(settings))
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
    """The chosen job's state, progress, curves and log; refreshes itself every 2 s."""
    job = _job_choice()
    if job is None:
        return
    state = job.state()
    st.progress(job.fraction_done(), text=f"{job.id}: {state}")
    history = job.history()
    if history:
        st.plotly_chart(training_curves(history), key=f"curves_{job.id}_{len(history)}")
    if state == "running":
        left, right = st.columns(2)
        if left.button("Stop (keep the best weights so far)"):
            job.stop()
        if right.button("Cancel (register nothing)"):
            job.kill()
    with st.expander("Log"):
        st.code(job.log_tail() or "(empty)")
    if state in ("finished", "stopped"):
        job_evaluation(job)
    elif state in ("failed", "interrupted", "cancelled"):
        st.error(f"The job {state}. The end of its log says why.")


def job_evaluation(job: Job) -> None:
    """The registered model's test evaluation and a button to make it the task's default."""
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
    if st.button("Make it the default model for its task"):
        ModelStore().set_default(report["task"], report["model"])
        st.success(f"{report['model']} is now the default for {report['task']}.")
