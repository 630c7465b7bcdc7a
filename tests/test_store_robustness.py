"""The case log against unusable databases, over-long values, filters with edge cases, files
shared between saves and account names: clear errors, correct answers, no lost files."""

import getpass
import os
import re
import time

import pytest
from sqlalchemy import event

from leuko.cli import main
from leuko.store import (REFERENCE_MAX_CHARS, CaseFilter, CaseStore, CellEntry, ImageEntry, StoreError,
                         StoreUnavailableError)
from leuko.store.models import Case, ImageRecord, User
from leuko.store.service import REPAIR_MIN_AGE_S
from tests.test_store import crop, png, prediction, store, store_url  # noqa: F401 - fixtures

NOT_A_DATABASE = b"this is not an SQLite file" * 100


def _age(path, seconds: float = REPAIR_MIN_AGE_S + 60) -> None:
    """Make ``path`` look written ``seconds`` ago."""
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_a_corrupt_database_file_is_reported_not_crashed(tmp_path):
    database = tmp_path / "leuko.db"
    database.write_bytes(NOT_A_DATABASE)
    url = f"sqlite:///{database}"
    with pytest.raises(StoreUnavailableError, match=f"not a database.*{re.escape(str(database))}.*Leuko case database"):
        CaseStore(url=url, home=tmp_path)
    unopened = CaseStore(url=url, home=tmp_path, upgrade_schema=False)
    with pytest.raises(StoreUnavailableError, match="cannot be reached: file is not a database"):
        unopened.list_cases()
    with pytest.raises(StoreUnavailableError, match="cannot be written: file is not a database"):
        unopened.create_user("ann", "long-enough", "analyst")
    with pytest.raises(StoreUnavailableError, match="cannot be reached"):
        unopened.save_case("C-1", "ann", [crop(1)])
    unopened.close()


@pytest.mark.parametrize("url, reason", [("not a url", "Could not parse"),
                                         ("mysql://ann:secret@db.example/leuko", "MySQLdb"),
                                         ("nosuchdb://ann:secret@db.example/leuko", "nosuchdb")])
def test_a_bad_database_url_is_reported_without_its_password(tmp_path, url, reason):
    with pytest.raises(StoreUnavailableError, match=f"cannot be opened: .*{reason}.*check LEUKO_DB_URL") as caught:
        CaseStore(url=url, home=tmp_path)
    assert "secret" not in str(caught.value)


def test_the_cli_reports_a_bad_database_url_and_a_corrupt_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LEUKO_HOME", str(tmp_path))
    monkeypatch.setenv("LEUKO_DB_URL", "mysql://ann@db.example/leuko")
    assert main(["store", "check"]) == 2
    assert "error: the case database cannot be opened" in capsys.readouterr().err
    monkeypatch.delenv("LEUKO_DB_URL")
    (tmp_path / "leuko.db").write_bytes(NOT_A_DATABASE)
    assert main(["store", "check"]) == 2
    assert "is a readable Leuko case database" in capsys.readouterr().err


def test_a_reference_longer_than_its_column_is_refused(store):
    assert REFERENCE_MAX_CHARS == Case.__table__.c.reference.type.length
    with pytest.raises(StoreError, match=f"at most {REFERENCE_MAX_CHARS} characters"):
        store.save_case("R" * (REFERENCE_MAX_CHARS + 1), "adam", [crop(1)])
    case_id = store.save_case("R" * REFERENCE_MAX_CHARS, "adam", [crop(1)])
    assert store.case(case_id).reference == "R" * REFERENCE_MAX_CHARS
    assert store.check().ok


def test_a_long_file_name_is_shortened_keeping_its_extension(store):
    limit = ImageRecord.__table__.c.original_name.type.length
    long_name = "smear " * 60 + ".PNG"
    odd_extension = "scan." + "x" * 300
    case_id = store.save_case("LONG", "adam", [ImageEntry(png(0, 1), long_name, 32, 32, "crop", prediction()),
                                               ImageEntry(png(0, 2), odd_extension, 32, 32, "crop", prediction())])
    first, second = store.case(case_id).images
    assert len(first.original_name) == limit and first.original_name.endswith("\u2026.PNG")
    assert first.original_name.startswith("smear smear") and first.stored_path.endswith(".png")
    assert len(second.original_name) == limit and second.original_name.startswith("scan.xxx")
    assert second.stored_path.endswith(".bin")
    assert store.check().ok


def test_needs_review_means_a_flagged_result_or_a_field_without_cells(store):
    cells = [CellEntry((0, 0, 30, 30), False, png(1, 6), None, prediction()),
             CellEntry((50, 0, 30, 30), False, png(1, 7), None, prediction(needs_review=True))]
    saved = {
        "CONFIDENT-CROP": [crop(1)],
        "FLAGGED-CROP": [crop(2, needs_review=True)],
        "FIELD-ONE-FLAGGED": [ImageEntry(png(0, 3), "f.png", 200, 100, "field", cells=cells)],
        "FIELD-NO-CELLS": [crop(4), ImageEntry(png(0, 5), "empty.png", 200, 100, "field")],
        "CONFIDENT-FIELD": [ImageEntry(png(0, 8), "g.png", 200, 100, "field", cells=cells[:1])],
    }
    for reference, images in saved.items():
        store.save_case(reference, "adam", images)

    def references(needs_review: bool | None, task: str | None = None) -> set[str]:
        return {r["reference"] for r in store.list_cases(CaseFilter(needs_review=needs_review, task=task))[0]}

    flagged = {"FLAGGED-CROP", "FIELD-ONE-FLAGGED", "FIELD-NO-CELLS"}
    assert references(True) == flagged
    assert references(False) == set(saved) - flagged
    assert references(True, "all_binary") == flagged
    assert references(False, "all_binary") == {"CONFIDENT-CROP", "CONFIDENT-FIELD"}
    listed = store.list_cases()[0]
    assert {r["reference"] for r in listed if r["needs_review"]} == flagged
    assert {r["task"] for r in listed} == {"all_binary"}


def test_needs_review_with_a_task_counts_only_that_tasks_flags(store):
    other_task = crop(5, needs_review=True)
    other_task.prediction.task = "wbc_type"
    store.save_case("FLAGGED-WBC", "adam", [other_task])
    store.save_case("FLAGGED-ALL", "adam", [crop(6, needs_review=True)])
    found = store.list_cases(CaseFilter(needs_review=True, task="all_binary"))[0]
    assert [r["reference"] for r in found] == ["FLAGGED-ALL"]


def test_reviewer_filters_follow_each_images_latest_review(store):
    """An image reclassified from ALL to normal by another reviewer is found under its latest
    label and reviewer only, as the agreement figures and the export read it."""
    case_id = store.save_case("RECLASSIFIED", "adam", [crop(7)])
    image_id = store.case(case_id).images[0].id
    store.review(image_id, "rita", "ALL")
    store.review(image_id, "bob", "normal")

    def references(**criteria) -> list[str]:
        return [r["reference"] for r in store.list_cases(CaseFilter(**criteria))[0]]

    assert references(final_label="normal") == ["RECLASSIFIED"] and references(reviewer="bob") == ["RECLASSIFIED"]
    assert references(final_label="ALL") == [] and references(reviewer="rita") == []


def test_the_reference_filter_takes_percent_and_underscore_literally(store):
    for seed, reference in enumerate(("A%1", "AB1", "A_2", "AX2", "B\\3", "C/4")):
        store.save_case(reference, "adam", [crop(seed)])

    def references(text: str) -> list[str]:
        return sorted(r["reference"] for r in store.list_cases(CaseFilter(reference=text))[0])

    assert references("A%") == ["A%1"]
    assert references("A_") == ["A_2"]
    assert references("\\") == ["B\\3"] and references("/") == ["C/4"]
    assert references("A") == ["A%1", "AB1", "AX2", "A_2"]


def _before_the_transaction(store: CaseStore, monkeypatch, action) -> None:
    """Run ``action`` once, after the next save has written its files and before its
    transaction starts (where another writer can interleave)."""
    real_write, pending = store._write, [action]

    def write(work):
        if pending:
            pending.pop()()
        return real_write(work)

    monkeypatch.setattr(store, "_write", write)


def test_a_failed_save_keeps_a_file_another_case_saved_meanwhile(store, monkeypatch):
    other = CaseStore(url=store.url, home=store.home)
    _before_the_transaction(store, monkeypatch, lambda: other.save_case("SAME", "adam", [crop(7)]))
    with pytest.raises(StoreError, match="already exists"):
        store.save_case("SAME", "adam", [crop(7)])
    kept = other.case(other.list_cases()[0][0]["id"]).images[0]
    assert store.files.path(kept.stored_path).is_file()
    assert store.files.path(kept.predictions[0].cam_path).is_file()
    assert store.check().ok
    other.close()


def test_a_failed_save_deletes_the_files_only_it_wrote(store):
    store.save_case("KEEP", "adam", [crop(1)])
    before = store.files.all_files().keys()

    def clash_on_save(session, _context, _instances) -> None:
        session.add(User(username="rita", password_hash="x", role="analyst"))

    event.listen(store._sessions, "before_flush", clash_on_save, once=True)
    fresh = ImageEntry(png(0, 2), "fresh.png", 32, 32, "crop", prediction())
    with pytest.raises(StoreError, match="could not be saved"):
        store.save_case("FAILS", "adam", [crop(1), fresh])
    assert store.files.all_files().keys() == before and store.check().ok


def test_a_save_restores_its_files_deleted_before_its_transaction(store, monkeypatch):
    def delete_every_file() -> None:
        for relative in store.files.all_files():
            store.files.path(relative).unlink()

    _before_the_transaction(store, monkeypatch, delete_every_file)
    image = store.case(store.save_case("C-1", "adam", [crop(9)])).images[0]
    assert store.files.path(image.stored_path).is_file() and store.files.path(image.predictions[0].cam_path).is_file()
    assert store.check().ok


def test_repair_keeps_recent_files_and_temporaries_of_saves_in_progress(store):
    store.save_case("C-1", "adam", [crop(1)])
    folder = store.files.root / "ab"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "new-orphan.png").write_bytes(b"x")
    (folder / ".partial-abc123").write_bytes(b"half")
    (folder / "old-orphan.png").write_bytes(b"y")
    (folder / ".partial-old").write_bytes(b"left by a crash")
    _age(folder / "old-orphan.png")
    _age(folder / ".partial-old")
    report = store.check(repair=True)
    assert report.orphan_files == ["ab/.partial-old", "ab/old-orphan.png"]
    assert report.recent_files == ["ab/.partial-abc123", "ab/new-orphan.png"]
    assert sorted(p.name for p in folder.iterdir()) == [".partial-abc123", "new-orphan.png"]
    assert store.check().ok


def test_storing_known_content_again_makes_it_recent(store):
    relative, _ = store.files.put(b"content", ".png")
    _age(store.files.path(relative))
    assert store.check().orphan_files == [relative]
    store.files.put(b"content", ".png")
    assert store.check().recent_files == [relative] and store.check(repair=True).orphan_files == []
    assert store.files.path(relative).is_file()


def test_accounts_need_a_name_and_a_duplicate_is_a_clear_error(store):
    for blank in ("", "   ", "\t"):
        with pytest.raises(StoreError, match="needs a user name"):
            store.create_user(blank, "long-enough", "analyst")
    with pytest.raises(StoreError, match="at most 64"):
        store.create_user("u" * 65, "long-enough", "analyst")
    with pytest.raises(StoreError, match="user 'rita' already exists"):
        store.create_user("rita", "long-enough", "analyst")
    with pytest.raises(StoreError, match="user 'RITA' already exists as 'rita'"):
        store.create_user("RITA", "long-enough", "analyst")
    store.create_user("Émile", "long-enough", "analyst")
    with pytest.raises(StoreError, match="user 'émile' already exists as 'Émile'"):
        store.create_user("émile", "long-enough", "analyst")
    with pytest.raises(StoreError, match="begins or ends with a space"):
        store.create_user(" bob ", "long-enough", "analyst")
    assert store.role_of("RITA") is None and store.role_of(" bob ") is None

    def add_twice(session, _context, _instances) -> None:
        if any(isinstance(obj, User) and obj.username == "racer" for obj in session.new):
            session.add(User(username="racer", password_hash="x", role="analyst"))

    event.listen(store._sessions, "before_flush", add_twice, once=True)
    with pytest.raises(StoreError, match="user 'racer' already exists"):
        store.create_user("racer", "long-enough", "analyst")
    assert store.role_of("racer") is None


def test_store_add_user_command_requires_a_username(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LEUKO_HOME", str(tmp_path))
    monkeypatch.delenv("LEUKO_DB_URL", raising=False)
    monkeypatch.setattr(getpass, "getpass", lambda prompt="": "long-enough")
    with pytest.raises(SystemExit) as exited:
        main(["store", "add-user"])
    assert exited.value.code == 2 and "--username" in capsys.readouterr().err
    assert main(["store", "add-user", "--username", "  "]) == 2
    assert "needs a user name" in capsys.readouterr().err
    assert main(["store", "add-user", "--username", "ann", "--role", "reviewer"]) == 0
    assert main(["store", "add-user", "--username", "ann"]) == 2
    assert "user 'ann' already exists" in capsys.readouterr().err


def test_a_write_waits_for_another_writer_and_says_so_when_it_never_finishes(tmp_path, monkeypatch):
    import sqlite3
    import threading

    monkeypatch.setattr("leuko.store.db.BUSY_TIMEOUT_MS", 50)
    store = CaseStore(home=tmp_path)
    other = sqlite3.connect(tmp_path / "leuko.db", isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    release = threading.Timer(0.6, lambda: other.execute("COMMIT"))
    release.start()
    store.create_user("ann", "long-enough", "analyst")
    release.join()
    assert store.authenticate("ann", "long-enough").username == "ann"

    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreUnavailableError, match="stayed busy.*database is busy.*locked"):
            store.create_user("bob", "long-enough", "analyst")
        with pytest.raises(StoreUnavailableError, match="^the case database is busy .*try again in a moment$"):
            store.list_cases()
    finally:
        other.execute("ROLLBACK")
        other.close()
    store.create_user("bob", "long-enough", "analyst")
    store.close()
