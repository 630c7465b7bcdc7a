"""Fault injection: a full disk, an unusable data folder, the database gone, a missing model,
CUDA asked for where there is none, an expired sign-in. Each gives a clear message, loses
nothing already saved, and work resumes once the fault clears."""

import errno
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

from leuko.analysis import AnalysisSettings, Analyzer
from leuko.device import DeviceError
from leuko.modelstore import ModelIntegrityError, ModelNotFoundError
from leuko.paths import REPO_ROOT, SHIPPED_MODELS
from leuko.store import CaseStore, StoreUnavailableError
from leuko.store.files import FileStore
from tests.test_hostile_inputs import ACCEPTED, REFUSED
from tests.test_store import crop

PG_URL = os.environ.get("LEUKO_TEST_PG_URL")


def test_a_full_disk_refuses_the_save_cleanly_and_the_next_save_works(tmp_path, monkeypatch):
    store = CaseStore(home=tmp_path / "home")
    store.save_case("KEPT", "ann", [crop(1)])
    real_put = FileStore.put
    calls = {"n": 0}

    def put_until_full(self, data, suffix, created=None):
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_put(self, data, suffix, created)

    monkeypatch.setattr(FileStore, "put", put_until_full)
    with pytest.raises(StoreUnavailableError, match="No space left on device.*nothing was saved"):
        store.save_case("FULL", "ann", [crop(2)])
    monkeypatch.setattr(FileStore, "put", real_put)
    report = store.check()
    assert report.ok and store.list_cases()[1] == 1
    store.save_case("FULL", "ann", [crop(2)])
    assert [c["reference"] for c in store.list_cases()[0]] == ["FULL", "KEPT"]
    store.close()


def test_an_unusable_data_folder_is_named_in_the_message(tmp_path):
    not_a_folder = tmp_path / "home"
    not_a_folder.write_text("a file where the data folder should be")
    with pytest.raises(StoreUnavailableError, match="cannot be used.*LEUKO_HOME"):
        CaseStore(home=not_a_folder)


def test_an_unreachable_database_is_reported_not_crashed(tmp_path):
    with pytest.raises(StoreUnavailableError, match="cannot be reached"):
        CaseStore(url="postgresql+psycopg://leuko@127.0.0.1:9/none", home=tmp_path)


def _second_postgres() -> tuple[str, Path]:
    """A PostgreSQL server of this test's own (so stopping it disturbs no other test)."""
    url = subprocess.run(["bash", str(REPO_ROOT / ".ci" / "postgres.sh")], capture_output=True, text=True,
                         check=True).stdout.strip().splitlines()[-1]
    port = url.rsplit(":", 1)[1].split("/")[0]
    data = next(d for d in Path("/tmp").glob("leuko-pg.*") if f"-p {port} " in (d / "start-command").read_text())
    return url, data


def _pg(data: Path, action: str) -> None:
    command = (data / f"{action}-command").read_text().strip()
    subprocess.run(["su", "postgres", "-s", "/bin/sh", "-c", command], check=True, capture_output=True)


@pytest.mark.skipif(not PG_URL or shutil.which("su") is None, reason="PostgreSQL fault test runs in .ci/run")
def test_postgres_stopped_mid_session_then_restarted(tmp_path):
    url, data = _second_postgres()
    try:
        store = CaseStore(url=url, home=tmp_path)
        store.save_case("BEFORE", "ann", [crop(1)])
        _pg(data, "stop")
        with pytest.raises(StoreUnavailableError, match="cannot be (reached|written)"):
            store.save_case("DURING", "ann", [crop(2)])
        with pytest.raises(StoreUnavailableError):
            store.list_cases()
        _pg(data, "start")
        store.save_case("DURING", "ann", [crop(2)])
        assert sorted(c["reference"] for c in store.list_cases()[0]) == ["BEFORE", "DURING"]
        assert store.check().ok
        store.close()
    finally:
        subprocess.run(["su", "postgres", "-s", "/bin/sh", "-c", (data / "stop-command").read_text().strip()],
                       capture_output=True)


def test_a_missing_or_deleted_model_gives_a_clear_error(tmp_path, leuko_home):
    with pytest.raises(ModelNotFoundError, match="no model 'gone'.*available"):
        Analyzer(AnalysisSettings("all_binary", model_id="gone"))
    user_models = leuko_home / "models"
    user_models.mkdir(parents=True)
    card = json.loads((SHIPPED_MODELS / "all_binary-lite0.json").read_text())
    card["id"] = "no-weights"
    (user_models / "no-weights.json").write_text(json.dumps(card))
    with pytest.raises(ModelIntegrityError, match="weights file .* is missing"):
        Analyzer(AnalysisSettings("all_binary", model_id="no-weights"))
    app = AppTest.from_file(str(REPO_ROOT / "pages" / "1_Analyze.py"), default_timeout=120).run()
    app.sidebar.selectbox[1].set_value("no-weights").run()
    assert not app.exception and "weights file" in app.error[0].value and app.button[0].disabled
    app.sidebar.selectbox[1].set_value("all_binary-lite0").run()
    assert not app.error


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_asked_for_where_there_is_none(leuko_home):
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        Analyzer(AnalysisSettings("all_binary", device="cuda"))
    app = AppTest.from_file(str(REPO_ROOT / "pages" / "1_Analyze.py"), default_timeout=120).run()
    next(s for s in app.sidebar.selectbox if s.label == "Device").set_value("cuda").run()
    assert not app.exception and "no CUDA GPU" in app.error[0].value


def test_an_expired_sign_in_must_sign_in_again(leuko_home):
    app = AppTest.from_file(str(REPO_ROOT / "pages" / "2_Cases.py"), default_timeout=60)
    app.session_state["user"] = {"name": "rita", "role": "reviewer", "since": time.time() - 9 * 3600}
    app.run()
    assert "Sign in" in app.info[0].value and "user" not in app.session_state


def test_every_corpus_file_is_analysed_or_refused_and_the_app_keeps_running(tmp_path, leuko_home, monkeypatch):
    for label in ("ALL", "normal"):
        (tmp_path / "examples" / label).mkdir(parents=True)
    for index, make in enumerate([*(m for m, _ in REFUSED.values()), *ACCEPTED.values()]):
        label = ("ALL", "normal")[index % 2]
        (tmp_path / "examples" / label / f"corpus{index:02d}.png").write_bytes(make())
    monkeypatch.setenv("LEUKO_EXAMPLES", str(tmp_path / "examples"))
    app = AppTest.from_file(str(REPO_ROOT / "pages" / "1_Analyze.py"), default_timeout=300).run()
    app.multiselect[0].set_value(list(app.multiselect[0].options)).run()
    app.button[0].click().run()
    assert not app.exception
    refused = [e.value for e in app.error if e.value.startswith("Not analysed")]
    assert len(refused) == len(REFUSED) and len(app.session_state["analyses"]) == len(ACCEPTED)
