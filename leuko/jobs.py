"""Training jobs that run in their own process and outlive the page that started them.

Each job is a folder under ``$LEUKO_HOME/jobs/``: the configuration (``config.yaml``), the
progress events the training appends (``events.jsonl``), its console output (``log.txt``),
the process id, the exit code once it ends, and the test evaluation report. Any process can
follow a job from its folder alone, so reloading the Train page, or restarting the app,
loses nothing.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import yaml

from leuko.config import TrainConfig
from leuko.modelstore import ModelStore
from leuko.paths import REPO_ROOT, leuko_home
from leuko.store import CaseStore
from leuko.store.export import export_dataset

MIN_REVIEWED_CROPS = 10
JOB_DATA = "data"
"""Sub-folder of a job holding the crops it copied from the case log, deleted when it ends."""


def jobs_dir() -> Path:
    return leuko_home() / "jobs"


@dataclass(frozen=True)
class JobProgress:
    """Where a job is: the share of its planned training steps done (0-1), the epoch in
    training of how many (0: not known yet) and the estimated seconds left (``None``: not
    known yet)."""

    fraction: float
    epoch: int = 0
    epochs: int = 0
    eta_s: float | None = None


@dataclass
class Job:
    """One training job, read from its folder."""

    folder: Path

    @property
    def id(self) -> str:
        return self.folder.name

    @property
    def config(self) -> TrainConfig:
        return TrainConfig.from_yaml(self.folder / "config.yaml")

    @property
    def report_dir(self) -> Path:
        return self.folder / "report"

    def events(self) -> list[dict]:
        """Every progress event so far (a line being written is skipped)."""
        path = self.folder / "events.jsonl"
        if not path.is_file():
            return []
        events = []
        for line in path.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return events

    def history(self) -> list[dict]:
        """Per finished epoch: epoch number and its train/validation figures."""
        return [{"epoch": e["epoch"], **e["metrics"]} for e in self.events() if e["kind"] == "epoch"]

    def progress(self) -> JobProgress:
        """How far the training is (:class:`JobProgress`), from its last step or epoch event;
        done (fraction 1) once the job has ended. The time left is the training's own
        estimate at an epoch's end, else the elapsed time scaled by the share still to do."""
        if self.state() != "running":
            return JobProgress(1.0)
        steps = [e for e in self.events() if e["kind"] in ("step", "epoch") and e.get("epochs")]
        if not steps:
            return JobProgress(0.0)
        last = steps[-1]
        within = last["step"] / last["steps"] if last["kind"] == "step" and last.get("steps") else 1.0
        fraction = min(1.0, (last["epoch"] - 1 + within) / last["epochs"])
        eta = last.get("eta_s")
        if eta is None and fraction > 0 and last.get("elapsed_s"):
            eta = last["elapsed_s"] * (1 - fraction) / fraction
        return JobProgress(fraction, last["epoch"], last["epochs"], eta)

    def fraction_done(self) -> float:
        """Share of the planned training steps done, 0-1 (1 once the job has ended)."""
        return self.progress().fraction

    def exit_code(self) -> int | None:
        path = self.folder / "exit_code"
        try:
            return int(path.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def _alive(self) -> bool:
        try:
            pid = int((self.folder / "pid").read_text())
        except (FileNotFoundError, ValueError):
            return False
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return False
        except ChildProcessError:
            pass
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def state(self) -> str:
        """``running``, ``finished``, ``stopped`` (asked to stop; best weights registered, or
        nothing when no epoch had been validated: see :meth:`no_model_reason`),
        ``cancelled`` (ended at once, nothing registered), ``failed`` (see the log) or
        ``interrupted`` (the process vanished, e.g. a reboot)."""
        code = self.exit_code()
        if code is None:
            if self._alive():
                return "running"
            return "cancelled" if (self.folder / "cancelled").exists() else "interrupted"
        if code != 0:
            return "failed"
        return "stopped" if (self.folder / "stop").exists() else "finished"

    def stop(self) -> None:
        """Ask the training to stop after its current step; the best weights so far are then
        calibrated, evaluated and registered as usual, or nothing is registered when no epoch
        has been validated yet."""
        (self.folder / "stop").touch()

    def kill(self) -> None:
        """End the process at once; nothing is registered, and the crops it copied from the
        case log are deleted."""
        (self.folder / "cancelled").touch()
        try:
            os.killpg(int((self.folder / "pid").read_text()), signal.SIGTERM)
        except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
            pass
        shutil.rmtree(self.folder / JOB_DATA, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        path = self.folder / "log.txt"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else ""

    def model_id(self) -> str | None:
        """The registered model's id, once the job has finished or stopped."""
        report = self.report_dir / "metrics.json"
        if self.state() in ("finished", "stopped") and report.is_file():
            return json.loads(report.read_text())["model"]
        return None

    def no_model_reason(self) -> str | None:
        """Why a job that ended without an error (finished or stopped) registered no model,
        e.g. "stopped before the first epoch finished: no model registered", from the
        training's last message; ``None`` while it runs, when it failed or once a model is
        registered."""
        if self.state() not in ("finished", "stopped") or (self.report_dir / "metrics.json").is_file():
            return None
        messages = [e["message"] for e in self.events() if e["kind"] == "message" and e.get("message")]
        return messages[-1] if messages else "no model was registered"


def start_training(config: TrainConfig, replace: bool = False, reviewed_cases: CaseStore | None = None) -> Job:
    """Start ``python -m leuko train`` on ``config`` in a new process group and return its job.

    With ``reviewed_cases`` the job trains on the crops of that case log's signed-off cases
    (:func:`export_reviewed_crops`, whose refusals are passed on and leave nothing behind),
    copied into the job's own folder under ``$LEUKO_HOME`` rather than a shared temporary
    folder, and deleted when the job ends or is cancelled (or, if the app or the host stopped
    first, when the next job starts: :func:`delete_leftover_crops`).

    The model is registered into the user's models folder (``$LEUKO_HOME/models``). A model id
    that is taken is refused with a ``ValueError`` before anything starts, so no model is
    silently replaced or shadowed; ``replace`` allows retraining a model of the same task
    under its id (:meth:`leuko.modelstore.ModelStore.check_new_id`). An id a running job is
    training is refused too, as the job that ended last would replace the other's model.
    """
    delete_leftover_crops()
    if config.model_id:
        ModelStore().check_new_id(config.model_id, config.task, replace=replace)
        if config.model_id in running_model_ids():
            raise ValueError(f"a running training job is already training model {config.model_id!r}; "
                             "choose another id or wait for it to end")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    folder = jobs_dir() / f"{config.task}-{stamp}"
    folder.mkdir(parents=True)
    try:
        if reviewed_cases is not None:
            export_reviewed_crops(reviewed_cases, config.task, folder / JOB_DATA)
            config = dataclasses.replace(config, data_root=str(folder / JOB_DATA), manifest="manifest.csv",
                                         folder=None, datasets=None, extra_train=None)
        config = config.with_overrides(model_id=config.model_id or f"{config.task}-{config.arch}-{stamp[:15]}",
                                       out_dir=str(folder / "runs"))
        (folder / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        command = [sys.executable, "-m", "leuko", "train", "--config", str(folder / "config.yaml"),
                   "--events", str(folder / "events.jsonl"), "--report", str(folder / "report"),
                   "--stop-file", str(folder / "stop")]
        with (folder / "log.txt").open("w") as log:
            process = subprocess.Popen(["sh", "-c", f'"$@"; code=$?; rm -rf "${{0%/*}}/{JOB_DATA}"; echo $code > "$0"',
                                        str(folder / "exit_code"), *command],
                                       stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    (folder / "pid").write_text(str(process.pid))
    return Job(folder)


def running_model_ids() -> set[str]:
    """The model ids that running jobs are training (a job whose settings no longer load is
    skipped)."""
    ids = set()
    for job in list_jobs():
        if job.state() == "running":
            try:
                ids.add(job.config.model_id)
            except (OSError, ValueError):
                continue
    return ids


def delete_leftover_crops() -> None:
    """Delete the case crops of launched jobs that have ended without their wrapper removing
    them (the app or the host stopped mid-run), so no copy outlives its job."""
    for job in list_jobs():
        if (job.folder / JOB_DATA).exists() and (job.folder / "pid").is_file() and job.state() != "running":
            shutil.rmtree(job.folder / JOB_DATA, ignore_errors=True)


def list_jobs() -> list[Job]:
    """All jobs, newest first."""
    folder = jobs_dir()
    if not folder.is_dir():
        return []
    return [Job(p) for p in sorted(folder.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True) if p.is_dir()]


def find_report(model_id: str) -> Path | None:
    """The folder of a model's test evaluation plots: the repository's ``reports/<id>`` for
    shipped models, else the training job's report."""
    shipped = REPO_ROOT / "reports" / model_id
    if (shipped / "metrics.json").is_file():
        return shipped
    for job in list_jobs():
        report = job.report_dir / "metrics.json"
        if report.is_file() and json.loads(report.read_text()).get("model") == model_id:
            return job.report_dir
    return None


def export_reviewed_crops(store: CaseStore, task: str, folder: Path, min_crops: int = MIN_REVIEWED_CROPS) -> int:
    """Export ``task``'s crops from signed-off cases, with the reviewers' final labels, into
    ``folder`` as a dataset training reads (:func:`leuko.store.export.export_dataset`), and
    return how many there are.

    Fewer than ``min_crops``, or none in the validation or test split (fixed by each crop's
    digest, about one in ten each), is refused with a ``ValueError``. Then, and when the case log
    fails (:class:`leuko.store.StoreUnavailableError` is passed on), ``folder`` is removed if it
    did not exist or was empty before, so no copies of patients' crops are left behind.
    """
    folder = Path(folder)
    ours = not folder.exists() or not any(folder.iterdir())
    try:
        manifest = export_dataset(store, folder, task)
        with open(manifest, newline="") as handle:
            splits = Counter(row["split"] for row in csv.DictReader(handle))
        count = sum(splits.values())
        if count < min_crops:
            raise ValueError(f"only {count} crop(s) of this task in signed-off cases, fewer than {min_crops}: "
                             "review and sign more cases before training on them")
        missing = [name for split, name in (("val", "validation"), ("test", "test")) if not splits[split]]
        if missing:
            raise ValueError(f"none of the {count} crops falls in the {' or '.join(missing)} split (each crop's "
                             "split is fixed by its digest, about one in ten each): review and sign more cases "
                             "before training on them")
    except BaseException:
        if ours:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    return count
