import csv
import hashlib
import io
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from sqlalchemy import create_engine, delete, text, update
from sqlalchemy.exc import DBAPIError
from sklearn.metrics import cohen_kappa_score

from leuko.cli import main
from leuko.data import read_manifest
from leuko.store import (DUPLICATE, NO_LEUKOCYTE, NOT_LEUKOCYTE, CaseFilter, CaseStore, CellEntry, ImageEntry,
                         PermissionDenied, PredictionEntry, StoreError, counted_labels)
from leuko.store.export import case_pdf, cases_csv, export_dataset, safe_cell
from leuko.store.models import AuditEvent
from leuko.store.service import REPAIR_MIN_AGE_S
from leuko.tasks import get_task
from tests.conftest import synthetic_cell

PG_URL = os.environ.get("LEUKO_TEST_PG_URL")
BACKENDS = ["sqlite"] + (["postgresql"] if PG_URL else [])


def _reset_postgres(url: str) -> None:
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    engine.dispose()


@pytest.fixture(params=BACKENDS)
def store_url(request, tmp_path):
    if request.param == "postgresql":
        _reset_postgres(PG_URL)
        return PG_URL
    return f"sqlite:///{tmp_path / 'leuko.db'}"


@pytest.fixture
def store(store_url, tmp_path):
    store = CaseStore(url=store_url, home=tmp_path / "home")
    store.create_user("rita", "reviewer-pass", "reviewer")
    store.create_user("adam", "analyst-pass", "analyst")
    yield store
    store.close()


def png(label=0, seed=0) -> bytes:
    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray(synthetic_cell(label, 32, seed)).save(buffer, "PNG")
    return buffer.getvalue()


def prediction(label="ALL", confidence=0.9, needs_review=False, cam=True) -> PredictionEntry:
    other = "normal" if label == "ALL" else "ALL"
    return PredictionEntry("model-a", "a" * 64, "all_binary", {label: confidence, other: 1 - confidence}, label,
                           confidence, needs_review, 12.5, png(1, 99) if cam else None)


def crop(seed=0, **kwargs) -> ImageEntry:
    return ImageEntry(png(0, seed), f"cell{seed}.png", 32, 32, "crop", prediction(**kwargs))


def test_a_saved_case_comes_back_whole_with_its_files(store):
    case_id = store.save_case("C-1", "adam", [crop(1), crop(2, label="normal")], notes="smear 3",
                              clinical={"wbc": 25.0, "hemoglobin": 8.0})
    case = store.case(case_id)
    assert (case.reference, case.status, case.notes, case.clinical["wbc"]) == ("C-1", "new", "smear 3", 25.0)
    assert [i.original_name for i in case.images] == ["cell1.png", "cell2.png"]
    first = case.images[0]
    assert store.files.path(first.stored_path).read_bytes() == png(0, 1) and len(first.sha256) == 64
    assert first.predictions[0].probabilities["ALL"] == pytest.approx(0.9)
    assert store.files.path(first.predictions[0].cam_path).is_file()
    with pytest.raises(StoreError, match="already exists"):
        store.save_case("C-1", "adam", [crop(3)])
    with pytest.raises(StoreError, match="at least one image"):
        store.save_case("C-EMPTY", "adam", [])
    assert store.check().ok


def test_sign_off_needs_every_item_reviewed_and_the_reviewer_role(store):
    field = ImageEntry(png(0, 5), "field.png", 200, 100, "field",
                       cells=[CellEntry((0, 0, 30, 30), False, png(1, 6), {"nc_ratio": 2.0}, prediction()),
                              CellEntry((50, 0, 30, 30), True, png(1, 7), None, prediction(needs_review=True))])
    case_id = store.save_case("C-2", "adam", [crop(4), field])
    case = store.case(case_id)
    image, field_image = case.images
    with pytest.raises(StoreError, match="3 item"):
        store.sign_off(case_id, "rita")
    with pytest.raises(StoreError, match="not part of image"):
        store.review(field_image.id, "rita", "ALL", cell_id=10**6)
    with pytest.raises(StoreError, match="'blast' is not a label this image can be given \\(ALL, no leukocyte, normal\\)"):
        store.review(image.id, "rita", "blast")
    with pytest.raises(StoreError, match="'no leukocyte' is not a label"):
        store.review(field_image.id, "rita", NO_LEUKOCYTE, cell_id=field_image.cells[0].id)
    store.review(image.id, "rita", "ALL")
    store.review(field_image.id, "rita", "ALL", cell_id=field_image.cells[0].id)
    with pytest.raises(StoreError, match="field.png cell 2"):
        store.sign_off(case_id, "rita")
    store.review(field_image.id, "rita", "normal", "lymphocyte, not a blast", cell_id=field_image.cells[1].id)
    assert store.case(case_id).status == "reviewed"
    with pytest.raises(PermissionDenied, match="reviewer role"):
        store.sign_off(case_id, "adam")
    cell_reviews = [e for e in store.audit_trail(case_id) if e.action == "review" and e.entity == "cell"]
    assert [e.new["final_label"] for e in cell_reviews] == ["ALL", "normal"]
    store.sign_off(case_id, "rita")
    signed = store.case(case_id)
    assert signed.status == "signed" and signed.sign_off.signed_by == "rita"
    with pytest.raises(StoreError, match="signed"):
        store.review(image.id, "rita", "normal")


def test_audit_trail_records_old_and_new_values_and_cannot_be_edited(store):
    case_id = store.save_case("C-3", "adam", [crop(8)])
    image_id = store.case(case_id).images[0].id
    store.review(image_id, "rita", "ALL")
    store.review(image_id, "rita", "normal", "second look")
    events = store.audit_trail(case_id)
    actions = [e.action for e in events]
    assert actions[0] == "create_case" and actions.count("review") == 2
    last_review = [e for e in events if e.action == "review"][-1]
    assert last_review.old == {"final_label": "ALL"} and last_review.new["final_label"] == "normal"
    with pytest.raises(StoreError, match="append-only"), store.session() as session:
        session.get(AuditEvent, events[0].id).actor = "someone else"
    with pytest.raises(StoreError, match="append-only"), store.session() as session:
        session.delete(session.get(AuditEvent, events[0].id))
    with pytest.raises(DBAPIError, match="append-only"), store.session() as session:
        session.execute(update(AuditEvent).values(actor="someone else"))
    with pytest.raises(DBAPIError, match="append-only"), store.session() as session:
        session.execute(delete(AuditEvent))
    assert store.audit_trail(case_id)[0].actor == "adam" and len(store.audit_trail(case_id)) == len(events)


def test_history_filters_and_pagination(store):
    for k in range(12):
        case_id = store.save_case(f"H-{k:02d}", "adam", [crop(100 + k, label="ALL" if k % 3 else "normal",
                                                               needs_review=k % 4 == 0)])
        if k < 5:
            store.review(store.case(case_id).images[0].id, "rita", "ALL")
    rows, total = store.list_cases(page=1, page_size=5)
    assert total == 12 and [r["reference"] for r in rows] == ["H-11", "H-10", "H-09", "H-08", "H-07"]
    assert [r["reference"] for r in store.list_cases(page=3, page_size=5)[0]] == ["H-01", "H-00"]
    assert store.list_cases(CaseFilter(predicted_label="normal"))[1] == 4
    assert store.list_cases(CaseFilter(needs_review=True))[1] == 3
    assert store.list_cases(CaseFilter(final_label="ALL", reviewer="rita"))[1] == 5
    assert store.list_cases(CaseFilter(status="reviewed"))[1] == 5
    assert store.list_cases(CaseFilter(task="wbc_type"))[1] == 0
    assert store.list_cases(CaseFilter(reference="H-1"))[1] == 2


def test_a_cell_the_question_did_not_fit_is_not_counted_until_a_reviewer_labels_it(store):
    from leuko.store.service import counted_labels

    granulocyte = crop(3, label="ALL", needs_review=True)
    granulocyte.prediction.not_applicable = "not a lymphocyte (reads as neutrophil, 99.0%)"
    case_id = store.save_case("NA", "adam", [crop(4, label="normal"), granulocyte])
    assert counted_labels(store.case(case_id)) == {"all_binary": ["normal"]}
    store.review(store.case(case_id).images[1].id, "rita", "normal")
    assert counted_labels(store.case(case_id)) == {"all_binary": ["normal", "normal"]}


def test_a_case_whose_blood_count_disagreed_with_its_images_needs_review(store):
    agreeing = store.save_case("AGREES", "adam", [crop(1)], clinical={"blasts_pct": 40.0})
    disagreeing = store.save_case("DISAGREES", "adam", [crop(2, label="normal")], clinical={"blasts_pct": 60.0},
                                  count_disagrees=True)
    rows, total = store.list_cases(CaseFilter(needs_review=True))
    assert total == 1 and rows[0]["reference"] == "DISAGREES" and rows[0]["needs_review"]
    assert {r["id"]: r["needs_review"] for r in store.list_cases()[0]} == {agreeing: False, disagreeing: True}
    assert store.case(disagreeing).count_disagrees and not store.case(agreeing).count_disagrees


def test_agreement_statistics_match_scikit_learn(store):
    truth = ["ALL", "ALL", "normal", "normal", "ALL", "normal"]
    predicted = ["ALL", "normal", "normal", "normal", "ALL", "ALL"]
    for k, (p, t) in enumerate(zip(predicted, truth)):
        case_id = store.save_case(f"A-{k}", "adam", [crop(200 + k, label=p)])
        store.review(store.case(case_id).images[0].id, "rita", t)
    stats = store.agreement()["model-a"]
    assert stats["n"] == 6 and stats["accuracy"] == pytest.approx(4 / 6)
    assert stats["kappa"] == pytest.approx(cohen_kappa_score(predicted, truth))
    assert stats["confusion"]["ALL"]["normal"] == 1 and stats["confusion"]["normal"]["ALL"] == 1


def test_cells_reviewed_as_not_a_leukocyte_or_duplicate_are_not_counted_nor_in_agreement(store):
    """A neutrophil found as three cells (two of them its lobes) and a platelet found as a
    fourth: once reviewed so, the case counts one leukocyte and agreement one reviewed pair."""
    cells = [CellEntry((10 * k, 0, 30, 30), False, png(1, 20 + k), None, prediction()) for k in range(4)]
    case_id = store.save_case("LOBES", "adam", [ImageEntry(png(0, 19), "field.png", 200, 100, "field", cells=cells),
                                                crop(21, label="normal")])
    field, single = store.case(case_id).images
    first, lobe, other_lobe, platelet = (cell.id for cell in field.cells)
    with pytest.raises(StoreError, match="'duplicate' is not a label"):
        store.review(single.id, "rita", DUPLICATE)
    assert counted_labels(store.case(case_id)) == {"all_binary": ["ALL", "ALL", "ALL", "ALL", "normal"]}
    store.review(field.id, "rita", "ALL", cell_id=first)
    store.review(field.id, "rita", DUPLICATE, "lobe of cell 1", cell_id=lobe)
    store.review(field.id, "rita", DUPLICATE, cell_id=other_lobe)
    store.review(field.id, "rita", NOT_LEUKOCYTE, "platelet", cell_id=platelet)
    store.review(single.id, "rita", "ALL")
    assert counted_labels(store.case(case_id)) == {"all_binary": ["ALL", "ALL"]}
    stats = store.agreement()["model-a"]
    assert stats["n"] == 2 and set(stats["confusion"]) == {"ALL", "normal"}
    store.sign_off(case_id, "rita", "Blasts present.")
    assert store.case(case_id).sign_off.impression == "Blasts present."


def test_shift_fields_round_trip_and_reach_the_csv(store):
    unfamiliar = crop(30)
    unfamiliar.prediction.shift_score, unfamiliar.prediction.unfamiliar = 7.25, True
    unfamiliar.prediction.not_applicable = "not a lymphocyte: this question does not apply"
    familiar = crop(31)
    familiar.prediction.shift_score, familiar.prediction.unfamiliar = 0.5, False
    case_id = store.save_case("SHIFT", "adam", [unfamiliar, familiar, crop(32)])
    saved = [image.predictions[0] for image in store.case(case_id).images]
    assert [(p.shift_score, p.unfamiliar, p.not_applicable) for p in saved] == [
        (7.25, True, "not a lymphocyte: this question does not apply"), (0.5, False, None), (None, None, None)]
    rows = list(csv.DictReader(io.StringIO(cases_csv(store))))
    assert [(r["shift_score"], r["unfamiliar"], r["not_applicable"]) for r in rows] == [
        ("7.2500", "True", "not a lymphocyte: this question does not apply"), ("0.5000", "False", ""), ("", "", "")]


def test_predictions_and_sign_offs_logged_before_the_shift_columns_read_as_not_measured(tmp_path):
    """A case log at revision 0003 (before shift fields and impressions) is upgraded in place:
    its prediction reads as not measured and its sign-off has an empty impression."""
    from alembic import command
    from alembic.config import Config

    from leuko.store.db import MIGRATIONS, make_engine

    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = make_engine(url)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0003")
        now = "2026-11-01 10:00:00"
        connection.execute(text("INSERT INTO cases (id, reference, notes, created_by, created_at, status) "
                                f"VALUES (1, 'OLD', '', 'adam', '{now}', 'signed')"))
        connection.execute(text("INSERT INTO images (id, case_id, sha256, original_name, stored_path, size_bytes, "
                                "width, height, kind) VALUES (1, 1, 'x', 'a.png', 'a.png', 1, 1, 1, 'crop')"))
        connection.execute(text("INSERT INTO predictions (image_id, model_id, weights_sha256, task, probabilities, "
                                "label, confidence, needs_review, created_at) VALUES (1, 'm', 'w', 'all_binary', "
                                f"'{{\"ALL\": 0.9}}', 'ALL', 0.9, 0, '{now}')"))
        connection.execute(text(f"INSERT INTO sign_offs (case_id, signed_by, signed_at) VALUES (1, 'rita', '{now}')"))
    engine.dispose()
    store = CaseStore(url=url, home=tmp_path / "home")
    case = store.case(1)
    store.close()
    found = case.images[0].predictions[0]
    assert (found.shift_score, found.unfamiliar, found.not_applicable) == (None, None, None)
    assert case.sign_off.impression == "" and case.count_disagrees is False


def test_accounts_hash_passwords_and_lock_after_repeated_failures(store):
    with store.session() as session:
        from sqlalchemy import select
        from leuko.store.models import User
        stored = session.scalar(select(User).where(User.username == "rita")).password_hash
    assert "reviewer-pass" not in stored and stored.startswith("$argon2")
    assert store.authenticate("rita", "reviewer-pass").role == "reviewer"
    for _ in range(5):
        with pytest.raises(PermissionDenied, match="wrong password"):
            store.authenticate("rita", "guess")
    with pytest.raises(PermissionDenied, match="too many failed attempts"):
        store.authenticate("rita", "reviewer-pass")
    with pytest.raises(StoreError, match="at least 8"):
        store.create_user("bob", "short", "analyst")
    with pytest.raises(StoreError, match="role"):
        store.create_user("bob", "long-enough", "superuser")


def test_the_report_keeps_every_character_gives_units_and_lists_fields_without_cells(store, tmp_path):
    """Greek, Cyrillic and symbols print as typed (the core PDF fonts turned them into '?'),
    blood counts carry their units, a field's differential and cut cells are listed, and a
    field in which no leukocyte was found is exported with the review that confirmed it."""
    from pypdf import PdfReader

    field_cells = [CellEntry((0, 0, 30, 30), True, png(1, 6), None, prediction()),
                   CellEntry((50, 0, 30, 30), False, png(1, 7), None, prediction(label="normal"))]
    case_id = store.save_case("CASE-ŁÓ-1", "anaЖ", [
        ImageEntry(png(0, 3), "field.png", 200, 100, "field", cells=field_cells),
        ImageEntry(png(0, 5), "empty.png", 200, 100, "field")], notes="Ζήτα — ≥5% blasts",
        clinical={"hemoglobin": 9.0, "wbc": 40.0})
    empty = next(i for i in store.case(case_id).images if i.original_name == "empty.png")
    store.review(empty.id, "rita", NO_LEUKOCYTE, "checked at 100x")
    text = " ".join(page_text for page in PdfReader(case_pdf(store, case_id, tmp_path / "r.pdf")).pages
                    for page_text in page.extract_text().split())
    for expected in ("CASE-ŁÓ-1", "anaЖ", "Ζήτα — ≥5% blasts", "Hemoglobin 9 g/dL", "WBC 40 x10^9/L",
                     "ALL blast 1 50.0 Normal lymphocyte 1 50.0", "Blasts: 1 of 2 cells (50.0%)",
                     "(cut by the border)",
                     "No leukocyte was found in this field. Final: no leukocyte, by rita (checked at 100x)"):
        assert expected in text, expected
    rows = [row for row in csv.reader(io.StringIO(cases_csv(store))) if row[4] == "empty.png"]
    assert len(rows) == 1 and rows[0][10] == "True" and rows[0][11] == NO_LEUKOCYTE and rows[0][12] == "rita"


def test_exports_csv_pdf_and_a_dataset_training_can_read(store, tmp_path):
    case_id = store.save_case("=HYPERLINK(\"x\")", "adam", [crop(300), crop(301, label="normal")],
                              clinical={"wbc": 40.0, "platelets": 30.0, "age": 6})
    images = store.case(case_id).images
    store.review(images[0].id, "rita", "ALL", "-clear blast")
    store.review(images[1].id, "rita", "normal")
    store.sign_off(case_id, "rita")
    rows = list(csv.reader(io.StringIO(cases_csv(store))))
    assert rows[1][0].startswith("'=") and rows[1][11] == "ALL" and rows[1][13] == "rita"
    assert rows[1][2].endswith("+00:00")
    assert safe_cell("@cmd") == "'@cmd" and safe_cell("plain") == "plain"
    pdf = case_pdf(store, case_id, tmp_path / "case.pdf", {"model-a": "EfficientNet-Lite0, test accuracy 0.95"})
    assert pdf.read_bytes().startswith(b"%PDF") and pdf.stat().st_size > 2000
    unsigned = store.save_case("UNSIGNED", "adam", [crop(302)])
    store.review(store.case(unsigned).images[0].id, "rita", "ALL")
    disputed = store.save_case("DISPUTED", "adam", [crop(300)])
    store.review(store.case(disputed).images[0].id, "rita", "normal")
    store.sign_off(disputed, "rita")
    manifest = export_dataset(store, tmp_path / "dataset", "all_binary")
    assert len(manifest.read_text().splitlines()) == 2
    store.sign_off(unsigned, "rita")
    manifest = export_dataset(store, tmp_path / "dataset", "all_binary")
    assert len(manifest.read_text().splitlines()) == 3
    splits = {row["split"] for row in csv.DictReader(manifest.open())}
    samples = [s for split in splits for s in read_manifest(manifest, get_task("all_binary"), split)]
    assert sorted(s.label for s in samples) == [0, 1] and all(s.path.is_file() for s in samples)
    assert hashlib.sha256(png(0, 300)).hexdigest() not in manifest.read_text()


WRITER = """
import sys
from leuko.store import CaseStore, ImageEntry, PredictionEntry
store = CaseStore(url=sys.argv[1], home=sys.argv[2])
prefix, count = sys.argv[3], int(sys.argv[4])
for k in range(count):
    data = (prefix + str(k)).encode() * 2000
    p = PredictionEntry("m", "0" * 64, "all_binary", {"ALL": 0.7, "normal": 0.3}, "ALL", 0.7, False, 1.0,
                        (prefix + "cam" + str(k)).encode() * 500)
    case_id = store.save_case(prefix + str(k), "adam", [ImageEntry(data, "x.png", 1, 1, prediction=p)])
    if sys.argv[5] == "review":
        store.review(store.case(case_id).images[0].id, "rita", "ALL")
    print(k, flush=True)
"""


def test_a_writer_killed_mid_save_leaves_no_broken_rows(store, store_url, tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    process = subprocess.Popen([sys.executable, str(script), store_url, str(store.home), "K-", "100000", "none"],
                               stdout=subprocess.PIPE, text=True)
    for _ in range(5):
        process.stdout.readline()
    time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    planted = store.files.path("ab/left-by-an-earlier-crash.png")
    planted.parent.mkdir(parents=True, exist_ok=True)
    planted.write_bytes(png())
    report = store.check()
    assert report.missing_files == [] and "ab/left-by-an-earlier-crash.png" in report.recent_files
    long_ago = time.time() - REPAIR_MIN_AGE_S - 60
    for relative in report.recent_files:
        os.utime(store.files.path(relative), (long_ago, long_ago))
    repaired = store.check(repair=True)
    left_over = report.orphan_files + report.recent_files
    assert sorted(repaired.orphan_files) == sorted(left_over) and repaired.recent_files == []
    assert not any(store.files.path(relative).exists() for relative in left_over)
    assert store.check().ok
    rows, total = store.list_cases(CaseFilter(reference="K-"), page_size=10**6)
    assert total >= 5
    for row in rows:
        image = store.case(row["id"]).images[0]
        assert store.files.path(image.stored_path).is_file()


def test_threads_and_processes_save_400_cases_without_loss(store, store_url, tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    processes = [subprocess.Popen([sys.executable, str(script), store_url, str(store.home), f"P{p}-", "50", "review"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for p in range(4)]
    errors = []

    def thread_writer(t: int) -> None:
        local = None
        try:
            local = CaseStore(url=store_url, home=store.home)
            for k in range(25):
                case_id = local.save_case(f"T{t}-{k}", "adam", [crop(1000 + t * 100 + k)])
                local.review(local.case(case_id).images[0].id, "rita", "ALL")
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(repr(exc))
        finally:
            if local is not None:
                local.close()

    threads = [threading.Thread(target=thread_writer, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    outputs = [p.communicate(timeout=300)[1] for p in processes]
    assert errors == [] and all(p.returncode == 0 for p in processes), (errors, outputs)
    assert not any("locked" in o for o in outputs)
    assert store.list_cases(page_size=1)[1] == 400
    assert store.list_cases(CaseFilter(status="reviewed"), page_size=1)[1] == 400
    assert store.check().ok


def test_store_check_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LEUKO_HOME", str(tmp_path))
    monkeypatch.delenv("LEUKO_DB_URL", raising=False)
    local = CaseStore()
    local.save_case("CLI-1", "adam", [crop(1)])
    (local.files.root / "ab").mkdir(parents=True, exist_ok=True)
    (local.files.root / "ab" / "orphan.png").write_bytes(b"x")
    assert main(["store", "check"]) == 0
    assert "recent unreferenced file (kept: a save may be in progress): ab/orphan.png" in capsys.readouterr().out
    long_ago = time.time() - REPAIR_MIN_AGE_S - 60
    os.utime(local.files.root / "ab" / "orphan.png", (long_ago, long_ago))
    assert main(["store", "check"]) == 1
    assert "orphan file: ab/orphan.png" in capsys.readouterr().out
    assert main(["store", "check", "--repair"]) == 0
    assert main(["store", "check"]) == 0 and "store consistent" in capsys.readouterr().out
