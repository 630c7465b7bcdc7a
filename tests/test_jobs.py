"""Background training jobs: they run in their own process, report progress, stop on request."""

import time

import pytest

from leuko.config import TrainConfig
from leuko.jobs import Job, find_report, list_jobs, start_training
from leuko.modelstore import ModelStore


def _wait(job: Job, condition, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition(job):
        if time.monotonic() > deadline:
            job.kill()
            pytest.fail(f"job did not get there in time; log:\n{job.log_tail()}")
        time.sleep(0.5)


def _config(folder, epochs: int) -> TrainConfig:
    return TrainConfig(task="all_binary", folder=str(folder), input_size=32, epochs=epochs, batch_size=8,
                       pretrained="none", num_workers=0, early_stopping_patience=1000)


def test_job_trains_registers_and_reports(binary_folder, leuko_home):
    job = start_training(_config(binary_folder, 2))
    assert list_jobs()[0].id == job.id and job.state() == "running"
    _wait(job, lambda j: j.state() != "running")
    assert job.state() == "finished", job.log_tail()
    assert [h["epoch"] for h in job.history()] == [1, 2] and job.fraction_done() == 1.0
    model_id = job.model_id()
    card, folder = ModelStore().locate(model_id)
    assert folder == leuko_home / "models" and card.metrics["test"]["n"] == 16
    assert find_report(model_id) == job.report_dir and (job.report_dir / "roc.png").is_file()


def test_stop_ends_a_running_job_with_its_best_weights(binary_folder, leuko_home):
    job = start_training(_config(binary_folder, 500))
    _wait(job, lambda j: len(j.history()) >= 1 or j.state() != "running")
    assert 0.0 < job.fraction_done() < 1.0
    job.stop()
    _wait(job, lambda j: j.state() != "running")
    assert job.state() == "stopped" and job.model_id() is not None


def test_cancel_ends_a_job_at_once_and_registers_nothing(binary_folder, leuko_home):
    job = start_training(_config(binary_folder, 500))
    job.kill()
    _wait(job, lambda j: j.state() != "running", 60)
    assert job.state() == "cancelled" and job.model_id() is None
    assert not (leuko_home / "models").is_dir() or not list((leuko_home / "models").glob("*.json"))
