"""Background training jobs: they run in their own process, report progress, stop on request."""

import time

import pytest

from leuko.config import TrainConfig
from leuko.jobs import Job, export_reviewed_crops, find_report, list_jobs, start_training
from leuko.modelstore import ModelStore
from leuko.store import CaseStore, StoreUnavailableError
from tests.test_modelstore import _save
from tests.test_store import crop


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


def test_stop_before_the_first_epoch_registers_nothing_and_says_why(binary_folder, leuko_home):
    job = start_training(_config(binary_folder, 500))
    job.stop()
    _wait(job, lambda j: j.state() != "running")
    assert job.state() == "stopped" and job.model_id() is None, job.log_tail()
    assert job.no_model_reason() == "stopped before the first epoch finished: no model registered"
    assert not list((leuko_home / "models").glob("*.json"))


def test_a_taken_model_id_is_refused_before_a_job_starts(binary_folder, leuko_home):
    with pytest.raises(ValueError, match=r"another task \(wbc_type\)"):
        start_training(_config(binary_folder, 1).with_overrides(model_id="wbc_type-lite0"))
    _save(ModelStore(), "mine")
    with pytest.raises(ValueError, match="exists already"):
        start_training(_config(binary_folder, 1).with_overrides(model_id="mine"))
    assert list_jobs() == []
    job = start_training(_config(binary_folder, 1).with_overrides(model_id="mine"), replace=True)
    job.kill()
    _wait(job, lambda j: j.state() != "running", 60)
    assert job.config.model_id == "mine"


def test_an_id_a_running_job_is_training_is_refused(binary_folder, leuko_home):
    first = start_training(_config(binary_folder, 500).with_overrides(model_id="twice"))
    try:
        with pytest.raises(ValueError, match="already training model 'twice'"):
            start_training(_config(binary_folder, 1).with_overrides(model_id="twice"), replace=True)
        assert len(list_jobs()) == 1
    finally:
        first.kill()


def _signed_crops(home, count: int) -> CaseStore:
    store = CaseStore(home=home)
    store.create_user("rita", "reviewer-pass", "reviewer")
    case_id = store.save_case("SIGNED", "rita", [crop(seed) for seed in range(count)])
    for image in store.case(case_id).images:
        store.review(image.id, "rita", "ALL")
    store.sign_off(case_id, "rita")
    return store


def test_a_job_on_reviewed_cases_keeps_their_crops_in_its_folder_until_it_ends(leuko_home):
    store = _signed_crops(leuko_home, 13)
    config = TrainConfig(task="all_binary", input_size=32, epochs=1, batch_size=8, pretrained="none", num_workers=0)
    job = start_training(config, reviewed_cases=store)
    assert job.config.data_root == str(job.folder / "data")
    assert len((job.folder / "data" / "manifest.csv").read_text().splitlines()) == 14
    _wait(job, lambda j: j.state() != "running")
    assert job.state() == "finished", job.log_tail()
    assert not (job.folder / "data").exists() and job.model_id()
    store.close()


def test_reviewed_crops_replace_any_folder_or_dataset_filter_and_leftovers_are_deleted(leuko_home, binary_folder):
    """A preset naming a folder or datasets must not train on those instead of the reviewed
    crops; crops of a job that ended without its wrapper (the host stopped) are deleted when
    the next job starts."""
    from leuko.jobs import delete_leftover_crops

    store = _signed_crops(leuko_home, 13)
    config = TrainConfig(task="all_binary", folder=str(binary_folder), datasets=["all_idb2"], input_size=32,
                         epochs=1, batch_size=8, pretrained="none", num_workers=0)
    job = start_training(config, reviewed_cases=store)
    job.kill()
    _wait(job, lambda j: j.state() != "running")
    assert job.config.folder is None and job.config.datasets is None
    orphan = leuko_home / "jobs" / "orphan"
    (orphan / "data").mkdir(parents=True)
    (orphan / "pid").write_text("999999")
    delete_leftover_crops()
    assert not (orphan / "data").exists()
    store.close()


def test_a_refused_export_starts_no_job(leuko_home):
    store = _signed_crops(leuko_home, 9)
    with pytest.raises(ValueError, match="only 9 crop"):
        start_training(TrainConfig(task="all_binary", pretrained="none"), reviewed_cases=store)
    assert list_jobs() == [] and not list((leuko_home / "jobs").iterdir())
    store.close()


def test_reviewed_crops_are_exported_with_every_split_filled(tmp_path):
    store = _signed_crops(tmp_path / "home", 13)
    assert export_reviewed_crops(store, "all_binary", tmp_path / "data", min_crops=13) == 13
    rows = (tmp_path / "data" / "manifest.csv").read_text().splitlines()[1:]
    assert len(rows) == 13 and {row.rsplit(",", 1)[1] for row in rows} == {"train", "val", "test"}
    store.close()


@pytest.mark.parametrize("count, reason", [(9, "only 9 crop"), (10, "none of the 10 crops falls in the test split")])
def test_too_few_reviewed_crops_or_none_for_testing_are_refused_and_leave_no_copies(tmp_path, count, reason):
    """Nine crops are too few; the first ten of this test's crops have digests that put none
    in the test split, so training on them would fail at its test evaluation."""
    store = _signed_crops(tmp_path / "home", count)
    with pytest.raises(ValueError, match=reason):
        export_reviewed_crops(store, "all_binary", tmp_path / "data")
    assert not (tmp_path / "data").exists()
    store.close()


def test_an_unavailable_case_log_is_passed_on_and_leaves_no_folder(tmp_path):
    class Unavailable:
        def list_cases(self, *args, **kwargs):
            raise StoreUnavailableError("the case database cannot be reached")

    (tmp_path / "data").mkdir()
    with pytest.raises(StoreUnavailableError, match="cannot be reached"):
        export_reviewed_crops(Unavailable(), "all_binary", tmp_path / "data")
    assert not (tmp_path / "data").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("kept")
    with pytest.raises(StoreUnavailableError):
        export_reviewed_crops(Unavailable(), "all_binary", tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "kept"
