"""The case log's operations: save, review, sign off, query, agreement, audit, consistency.

Every write goes through :class:`CaseStore`. Files are stored first, then the rows are
committed in one transaction, so a crash leaves at worst unreferenced files (found and
removed by :meth:`CaseStore.check`), never a row pointing at a missing file. Files are
stored once per content, so a save may reuse another's file: deleting a file and committing
rows that refer to it are serialised (:meth:`CaseStore._lock_files`), and a save checks its
files again inside its transaction.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Callable, Iterator

from argon2 import PasswordHasher
from argon2.exceptions import VerificationError
from sqlalchemy import event, exists, func, not_, or_, select, text
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session, selectinload, sessionmaker

from leuko.paths import leuko_home
from leuko.store.db import (REFUSED_STATEMENTS, StoreUnavailableError, database_url, make_engine, unavailable,
                            upgrade)
from leuko.store.files import FileStore
from leuko.store.models import (NAME_MAX_CHARS, REFERENCE_MAX_CHARS, USERNAME_MAX_CHARS, AuditEvent, Case, Cell,
                                ImageRecord, Prediction, Review, SignOff, User, as_utc, utcnow)
from leuko.tasks import get_task

ROLES = ("analyst", "reviewer", "admin")
SIGNING_ROLES = ("reviewer", "admin")
MAX_FAILED_LOGINS = 5
LOCKOUT = timedelta(minutes=5)
REPAIR_MIN_AGE_S = 600
"""Unreferenced files (and ``.partial-`` temporaries) younger than this many seconds are never
deleted by :meth:`CaseStore.check`: they may belong to a save in progress, which writes its
files before its transaction and may then wait for a busy database (8 tries of up to 30 s)."""
NO_LEUKOCYTE = "no leukocyte"
"""Final label of a field image in which neither the cell finder nor the reviewer found a
leukocyte; confirming it counts as that image's review for sign-off."""
NOT_LEUKOCYTE = "not a leukocyte"
"""Final label of a field cell that is no leukocyte (a platelet, red cell, debris or stain)."""
DUPLICATE = "duplicate"
"""Final label of a field cell that is part of another found cell (a granulocyte's lobe)."""
EXCLUDED_LABELS = (NOT_LEUKOCYTE, DUPLICATE)
"""Final labels of field cells that are not counted: left out of the differential, the
report and the agreement statistics."""
PG_FILES_LOCK = 7_365_302
"""PostgreSQL advisory lock key of :meth:`CaseStore._lock_files`."""


class StoreError(ValueError):
    """An operation the case log refuses; the message says why."""


class _DatabaseBusy(StoreUnavailableError):
    """SQLite is locked by another writer; writes retry, reads report it."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"the case database is busy ({reason}); try again in a moment")


class PermissionDenied(StoreError):
    """The account's role does not allow the operation."""


@dataclass
class PredictionEntry:
    """A prediction to log. ``probabilities`` maps class ids to calibrated probabilities;
    ``cam_png``/``mask_png`` are optional overlay files; ``latency_ms`` in milliseconds;
    ``shift_score``, ``unfamiliar`` and ``not_applicable`` as in :class:`leuko.predict.Prediction`
    (``None``: not measured)."""

    model_id: str
    weights_sha256: str
    task: str
    probabilities: dict[str, float]
    label: str
    confidence: float
    needs_review: bool
    latency_ms: float | None = None
    cam_png: bytes | None = None
    mask_png: bytes | None = None
    shift_score: float | None = None
    unfamiliar: bool | None = None
    not_applicable: str | None = None


@dataclass
class CellEntry:
    """A cell of a field image: box (x, y, width, height in pixels), crop and results."""

    box: tuple[int, int, int, int]
    touches_border: bool = False
    crop_png: bytes | None = None
    morphometrics: dict | None = None
    prediction: PredictionEntry | None = None


@dataclass
class ImageEntry:
    """An image to log: its original bytes, name, kind (crop or field) and results; a crop's
    ``morphometrics`` (:meth:`leuko.morphometrics.Morphometrics.as_dict`), a field's per cell."""

    data: bytes
    original_name: str
    width: int
    height: int
    kind: str = "crop"
    prediction: PredictionEntry | None = None
    cells: list[CellEntry] = field(default_factory=list)
    morphometrics: dict | None = None


@dataclass
class CaseFilter:
    """History filters; ``None`` means any. Dates are inclusive datetimes (UTC).
    ``needs_review`` True keeps the cases a person must look at (a result flagged for review,
    or a field in which no leukocyte was found), False the others. ``final_label`` and
    ``reviewer`` match each image's (or cell's) latest review, which is the one that counts."""

    since: datetime | None = None
    until: datetime | None = None
    task: str | None = None
    predicted_label: str | None = None
    final_label: str | None = None
    needs_review: bool | None = None
    reviewer: str | None = None
    status: str | None = None
    reference: str | None = None


@dataclass
class ConsistencyReport:
    """Files no row refers to, and rows whose file is missing; unreferenced files younger than
    :data:`REPAIR_MIN_AGE_S` are listed apart (``recent_files``) as a save may still need them."""

    orphan_files: list[str]
    missing_files: list[str]
    recent_files: list[str] = field(default_factory=list)
    repaired: bool = False

    @property
    def ok(self) -> bool:
        return not self.orphan_files and not self.missing_files


def _extension(name: str) -> str:
    """The file name's extension (".png"), or "" when it has none or one over 10 characters,
    which no image format uses and which would not fit the stored path's column."""
    suffix = Path(name).suffix
    return suffix if len(suffix) <= 10 else ""


def _fit_name(name: str) -> str:
    """``name`` shortened to :data:`NAME_MAX_CHARS` (marked with an ellipsis, extension kept),
    so that a long upload name is stored instead of being refused by PostgreSQL."""
    if len(name) <= NAME_MAX_CHARS:
        return name
    suffix = _extension(name)
    return name[:NAME_MAX_CHARS - len(suffix) - 1] + "\u2026" + suffix


def _flagged(task: str | None):
    """The condition "the case needs review": a result flagged for review (of ``task`` when
    given), a field in which no leukocyte was found, or a blood count that disagreed with the
    images."""
    flagged_result = (select(ImageRecord.case_id).join(Prediction, Prediction.image_id == ImageRecord.id)
                      .where(Prediction.needs_review.is_(True)))
    if task is not None:
        flagged_result = flagged_result.where(Prediction.task == task)
    empty_field = select(ImageRecord.case_id).where(ImageRecord.kind == "field",
                                                    ~exists().where(Cell.image_id == ImageRecord.id))
    return or_(Case.id.in_(flagged_result), Case.id.in_(empty_field), Case.count_disagrees.is_(True))


def counted_labels(case: Case) -> dict[str, list[str]]:
    """Per task, the label of every leukocyte of a loaded case that counts in its differential:
    each crop and each field cell, with the reviewer's latest final label where given, else the
    model's. Cells reviewed as :data:`EXCLUDED_LABELS`, cells without a prediction, and
    unreviewed cells the task's question did not apply to (``not_applicable``), are left out."""
    labels: dict[str, list[str]] = {}
    for image in case.images:
        finals = {review.cell_id: review.final_label for review in image.reviews}
        for prediction in image.predictions:
            if prediction.cell_id not in finals and prediction.not_applicable:
                continue
            label = finals.get(prediction.cell_id, prediction.label)
            if label not in (NO_LEUKOCYTE, *EXCLUDED_LABELS):
                labels.setdefault(prediction.task, []).append(label)
    return labels


def _refuse_audit_changes(session: Session, _context, _instances) -> None:
    for obj in list(session.dirty) + list(session.deleted):
        if isinstance(obj, AuditEvent):
            raise StoreError("the audit trail is append-only: events cannot be changed or deleted")


class CaseStore:
    """The case log: an SQL database (SQLite by default) plus a content-addressed file store."""

    def __init__(self, url: str | None = None, home: Path | None = None, upgrade_schema: bool = True) -> None:
        self.home = Path(home or leuko_home())
        try:
            self.url = url or database_url(self.home)
        except OSError as exc:
            raise StoreUnavailableError(f"the data folder {self.home} cannot be used ({exc.strerror or exc}); "
                                        "set LEUKO_HOME to a writable folder") from exc
        self.engine = make_engine(self.url)
        self.files = FileStore(self.home / "files")
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        event.listen(self._sessions, "before_flush", _refuse_audit_changes)
        self.hasher = PasswordHasher()
        if upgrade_schema:
            upgrade(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def session(self, action: str = "reached") -> Iterator[Session]:
        """A session committed on success and rolled back on any error. A refused statement
        passes through; other database errors become :class:`StoreUnavailableError` saying
        the database could not be ``action`` (:class:`_DatabaseBusy` while SQLite is locked)."""
        session = self._sessions()
        try:
            yield session
            session.commit()
        except DBAPIError as exc:
            session.rollback()
            if isinstance(exc, REFUSED_STATEMENTS):
                raise
            if isinstance(exc, OperationalError) and ("locked" in str(exc.orig) or "busy" in str(exc.orig)):
                raise _DatabaseBusy(str(exc.orig)) from exc
            raise unavailable(exc, self.engine.url, action) from exc
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def _write(self, work):
        """Run ``work(session)`` in one transaction, retrying while SQLite is busy."""
        for attempt in range(8):
            try:
                with self.session("written") as session:
                    return work(session)
            except _DatabaseBusy as exc:
                last = exc
                time.sleep(0.1 * (attempt + 1))
        raise StoreUnavailableError(f"the case database stayed busy: {last}")

    @staticmethod
    def _audit(session: Session, actor: str, action: str, entity: str, entity_id: int | None,
               old: dict | None = None, new: dict | None = None) -> None:
        session.add(AuditEvent(actor=actor, action=action, entity=entity, entity_id=entity_id, old=old, new=new))

    # accounts ---------------------------------------------------------------------------

    def create_user(self, username: str, password: str, role: str, actor: str = "system") -> None:
        """Create a local account; the password is stored only as an argon2 hash."""
        if not (username and username.strip()):
            raise StoreError("an account needs a user name")
        if username != username.strip():
            raise StoreError(f"user name {username!r} begins or ends with a space; give it without")
        if len(username) > USERNAME_MAX_CHARS:
            raise StoreError(f"user names may have at most {USERNAME_MAX_CHARS} characters")
        if role not in ROLES:
            raise StoreError(f"role must be one of {', '.join(ROLES)}")
        if len(password) < 8:
            raise StoreError("passwords need at least 8 characters")

        def work(session: Session) -> None:
            taken = next((name for name in session.scalars(select(User.username))
                          if name.casefold() == username.casefold()), None)
            if taken:
                raise StoreError(f"user {username!r} already exists" + (f" as {taken!r}" if taken != username else ""))
            session.add(User(username=username, password_hash=self.hasher.hash(password), role=role))
            self._audit(session, actor, "create_user", "user", None, new={"username": username, "role": role})

        try:
            self._write(work)
        except IntegrityError as exc:
            raise StoreError(f"user {username!r} already exists") from exc

    def authenticate(self, username: str, password: str) -> User:
        """The user if the password matches; after 5 failures the account is locked 5 minutes."""

        def work(session: Session) -> User | str:
            user = session.scalar(select(User).where(User.username == username))
            if user is None:
                return "unknown user or wrong password"
            now = utcnow()
            locked = user.locked_until
            if locked is not None and as_utc(locked) > now:
                return "too many failed attempts: try again in a few minutes"
            try:
                self.hasher.verify(user.password_hash, password)
            except VerificationError:
                user.failed_logins += 1
                if user.failed_logins >= MAX_FAILED_LOGINS:
                    user.locked_until, user.failed_logins = now + LOCKOUT, 0
                    self._audit(session, username, "lockout", "user", user.id)
                return "unknown user or wrong password"
            user.failed_logins, user.locked_until = 0, None
            self._audit(session, username, "login", "user", user.id)
            return user

        result = self._write(work)
        if isinstance(result, str):
            raise PermissionDenied(result)
        return result

    def role_of(self, username: str) -> str | None:
        with self.session() as session:
            user = session.scalar(select(User).where(User.username == username))
            return user.role if user else None

    # cases ------------------------------------------------------------------------------

    @staticmethod
    def _lock_files(session: Session, exclusive: bool) -> None:
        """Serialise deleting stored files with committing rows that refer to them, until the
        session's transaction ends: a save holds the lock shared, a deleter exclusively. On
        SQLite every write transaction is already exclusive (``BEGIN IMMEDIATE`` at its first
        statement), so only PostgreSQL needs an advisory lock."""
        if session.get_bind().dialect.name == "postgresql":
            function = "pg_advisory_xact_lock" if exclusive else "pg_advisory_xact_lock_shared"
            session.execute(text(f"SELECT {function}({PG_FILES_LOCK})"))

    @staticmethod
    def _referenced(session: Session, among: set[str] | None = None) -> set[str]:
        """Stored files that rows refer to (only those ``among`` these paths when given)."""
        found: set[str] = set()
        for column in (ImageRecord.stored_path, Cell.crop_path, Prediction.cam_path, Prediction.mask_path):
            query = select(column).where(column.is_not(None))
            if among is not None:
                query = query.where(column.in_(among))
            found.update(session.scalars(query))
        return found

    def _discard(self, created: list[str]) -> None:
        """Delete the files a failed save wrote, except those a committed row refers to (another
        save may have stored the same content meanwhile). When the database cannot tell, the
        files stay, as unreferenced files for :meth:`check`."""
        if not created:
            return

        def work(session: Session) -> None:
            self._lock_files(session, exclusive=True)
            candidates = set(created)
            self.files.discard(candidates - self._referenced(session, candidates))

        with suppress(StoreUnavailableError):
            self._write(work)

    @staticmethod
    def _prediction_row(prediction: PredictionEntry, put: Callable[[bytes, str], tuple[str, str]]) -> Prediction:
        """A prediction row (image and cell ids set later) with its overlay files stored by ``put``."""
        cam = put(prediction.cam_png, ".png")[0] if prediction.cam_png else None
        mask = put(prediction.mask_png, ".png")[0] if prediction.mask_png else None
        return Prediction(image_id=0, cell_id=None, model_id=prediction.model_id,
                          weights_sha256=prediction.weights_sha256, task=prediction.task,
                          probabilities=prediction.probabilities, label=prediction.label,
                          confidence=prediction.confidence, needs_review=prediction.needs_review,
                          cam_path=cam, mask_path=mask, latency_ms=prediction.latency_ms,
                          shift_score=prediction.shift_score, unfamiliar=prediction.unfamiliar,
                          not_applicable=prediction.not_applicable)

    def save_case(self, reference: str, created_by: str, images: list[ImageEntry], notes: str = "",
                  clinical: dict | None = None, count_disagrees: bool = False) -> int:
        """Log a case with its images and results; returns the case id. ``count_disagrees``
        records that the blood count and the images disagreed (:mod:`leuko.concordance`), which
        makes the case need review.

        All files are written before the transaction starts; the rows then commit together.
        A reference longer than :data:`REFERENCE_MAX_CHARS` is refused; an original file name
        longer than :data:`NAME_MAX_CHARS` is shortened. When the save fails, the files it
        wrote are deleted unless another case uses them or the database cannot be reached.
        """
        if not reference.strip():
            raise StoreError("a case needs a (pseudonymous) reference")
        if len(reference) > REFERENCE_MAX_CHARS:
            raise StoreError(f"a case reference may have at most {REFERENCE_MAX_CHARS} characters "
                             f"(this one has {len(reference)})")
        if not images:
            raise StoreError("a case needs at least one image")
        with self.session() as session:
            if session.scalar(select(Case.id).where(Case.reference == reference)):
                raise StoreError(f"a case with reference {reference!r} already exists")
        created: list[str] = []
        contents: list[tuple[str, bytes]] = []
        stored = []

        def put(data: bytes, suffix: str) -> tuple[str, str]:
            relative, digest = self.files.put(data, suffix, created)
            contents.append((relative, data))
            return relative, digest

        def work(session: Session) -> int:
            if session.scalar(select(Case.id).where(Case.reference == reference)):
                raise StoreError(f"a case with reference {reference!r} already exists")
            self._lock_files(session, exclusive=False)
            for relative, data in contents:
                self.files.keep(relative, data, created)
            case = Case(reference=reference, notes=notes, clinical=clinical, created_by=created_by,
                        count_disagrees=count_disagrees)
            session.add(case)
            session.flush()
            for image, path, digest, crops, predictions in stored:
                record = ImageRecord(case_id=case.id, sha256=digest, original_name=_fit_name(image.original_name),
                                     stored_path=path, size_bytes=len(image.data), width=image.width,
                                     height=image.height, kind=image.kind, morphometrics=image.morphometrics)
                session.add(record)
                session.flush()
                if predictions[0] is not None:
                    predictions[0].image_id = record.id
                    session.add(predictions[0])
                for index, (cell, crop, made) in enumerate(zip(image.cells, crops, predictions[1:]), start=1):
                    x, y, w, h = cell.box
                    row = Cell(image_id=record.id, index=index, x=x, y=y, width=w, height=h,
                               touches_border=cell.touches_border, crop_path=crop, morphometrics=cell.morphometrics)
                    session.add(row)
                    session.flush()
                    if made is not None:
                        made.image_id, made.cell_id = record.id, row.id
                        session.add(made)
            self._audit(session, created_by, "create_case", "case", case.id,
                        new={"reference": reference, "images": len(images)})
            return case.id

        try:
            for image in images:
                path, digest = put(image.data, _extension(image.original_name).lower() or ".bin")
                crops = [put(cell.crop_png, ".png")[0] if cell.crop_png else None for cell in image.cells]
                predictions = [self._prediction_row(image.prediction, put) if image.prediction else None]
                predictions += [self._prediction_row(cell.prediction, put) if cell.prediction else None
                                for cell in image.cells]
                stored.append((image, path, digest, crops, predictions))
            return self._write(work)
        except OSError as exc:
            self._discard(created)
            raise StoreUnavailableError(f"the case's files could not be written under {self.files.root} "
                                        f"({exc.strerror or exc}); nothing was saved") from exc
        except REFUSED_STATEMENTS as exc:
            self._discard(created)
            raise StoreError(f"case {reference!r} could not be saved: {exc.orig}") from exc
        except StoreUnavailableError:
            raise
        except Exception:
            self._discard(created)
            raise

    def review(self, image_id: int, reviewer: str, final_label: str, comment: str = "",
               cell_id: int | None = None) -> None:
        """Confirm or reclassify an image (or one cell of a field) with a final label: a class of
        the task its predictions are for, :data:`NO_LEUKOCYTE` for a whole image, or one of
        :data:`EXCLUDED_LABELS` for a cell of a field."""

        def work(session: Session) -> None:
            image = session.get(ImageRecord, image_id)
            if image is None:
                raise StoreError(f"no image {image_id}")
            case = session.get(Case, image.case_id)
            if case.status == "signed":
                raise StoreError(f"case {case.reference} is signed; reviews can no longer change")
            if cell_id is not None and not any(c.id == cell_id for c in image.cells):
                raise StoreError(f"cell {cell_id} is not part of image {image_id}")
            allowed = {label for prediction in image.predictions for label in get_task(prediction.task).class_ids}
            allowed.update([NO_LEUKOCYTE] if cell_id is None else EXCLUDED_LABELS)
            if final_label not in allowed:
                raise StoreError(f"{final_label!r} is not a label this image can be given "
                                 f"({', '.join(sorted(allowed))})")
            previous = [r for r in image.reviews if r.cell_id == cell_id]
            session.add(Review(image_id=image_id, cell_id=cell_id, reviewer=reviewer, final_label=final_label,
                               comment=comment))
            self._audit(session, reviewer, "review", "cell" if cell_id else "image", cell_id or image_id,
                        old={"final_label": previous[-1].final_label} if previous else None,
                        new={"final_label": final_label, "comment": comment})
            session.flush()
            if not self._unreviewed(session, case):
                old, case.status = case.status, "reviewed"
                if old != "reviewed":
                    self._audit(session, reviewer, "status", "case", case.id, {"status": old}, {"status": "reviewed"})

        self._write(work)

    @staticmethod
    def _unreviewed(session: Session, case: Case) -> list[str]:
        """Items still waiting for a person: each crop image, and each cell of a field."""
        waiting = []
        for image in case.images:
            reviewed = {r.cell_id for r in session.scalars(select(Review).where(Review.image_id == image.id))}
            if image.kind == "field" and image.cells:
                waiting += [f"{image.original_name} cell {c.index}" for c in image.cells if c.id not in reviewed]
            elif None not in reviewed:
                waiting.append(image.original_name)
        return waiting

    def sign_off(self, case_id: int, username: str, impression: str = "") -> None:
        """Sign a case with the reviewer's ``impression`` (free text, printed on the report's
        first page). Refused without the reviewer role and while any image or cell is
        unreviewed (a needs-review result counts as unreviewed until a person labels it)."""
        role = self.role_of(username)
        if role not in SIGNING_ROLES:
            raise PermissionDenied(f"{username} ({role or 'unknown user'}) may not sign off: the reviewer role is needed")

        def work(session: Session) -> None:
            case = session.get(Case, case_id)
            if case is None:
                raise StoreError(f"no case {case_id}")
            if case.status == "signed":
                raise StoreError(f"case {case.reference} is already signed")
            waiting = self._unreviewed(session, case)
            if waiting:
                raise StoreError(f"cannot sign {case.reference}: {len(waiting)} item(s) still need review "
                                 f"({', '.join(waiting[:5])}{'...' if len(waiting) > 5 else ''})")
            session.add(SignOff(case_id=case.id, signed_by=username, impression=impression))
            self._audit(session, username, "sign_off", "case", case.id, {"status": case.status},
                        {"status": "signed", "impression": impression})
            case.status = "signed"

        self._write(work)

    def case(self, case_id: int) -> Case:
        """A case with its images, cells, predictions, reviews and sign-off loaded."""
        with self.session() as session:
            case = session.scalar(select(Case).where(Case.id == case_id).options(
                selectinload(Case.images).selectinload(ImageRecord.cells),
                selectinload(Case.images).selectinload(ImageRecord.predictions),
                selectinload(Case.images).selectinload(ImageRecord.reviews),
                selectinload(Case.sign_off)))
            if case is None:
                raise StoreError(f"no case {case_id}")
            return case

    def list_cases(self, filters: CaseFilter | None = None, page: int = 1, page_size: int = 50) -> tuple[list[dict], int]:
        """One page of cases (newest first) matching the filters, and the total count. Each row
        gives the case's tasks and whether it needs review (:class:`CaseFilter`'s meaning)."""
        filters = filters or CaseFilter()
        query = select(Case)
        if filters.since:
            query = query.where(Case.created_at >= filters.since)
        if filters.until:
            query = query.where(Case.created_at <= filters.until)
        if filters.status:
            query = query.where(Case.status == filters.status)
        if filters.reference:
            query = query.where(Case.reference.contains(filters.reference, autoescape=True))
        prediction_filters = [(Prediction.task, filters.task), (Prediction.label, filters.predicted_label)]
        if any(value is not None for _, value in prediction_filters):
            sub = select(ImageRecord.case_id).join(Prediction, Prediction.image_id == ImageRecord.id)
            for column, value in prediction_filters:
                if value is not None:
                    sub = sub.where(column == value)
            query = query.where(Case.id.in_(sub))
        if filters.needs_review is not None:
            flagged = _flagged(filters.task)
            query = query.where(flagged if filters.needs_review else not_(flagged))
        if filters.final_label is not None or filters.reviewer is not None:
            latest = select(func.max(Review.id)).group_by(Review.image_id, Review.cell_id)
            sub = (select(ImageRecord.case_id).join(Review, Review.image_id == ImageRecord.id)
                   .where(Review.id.in_(latest)))
            if filters.final_label is not None:
                sub = sub.where(Review.final_label == filters.final_label)
            if filters.reviewer is not None:
                sub = sub.where(Review.reviewer == filters.reviewer)
            query = query.where(Case.id.in_(sub))
        with self.session() as session:
            total = session.scalar(select(func.count()).select_from(query.subquery()))
            rows = session.scalars(query.order_by(Case.created_at.desc(), Case.id.desc())
                                   .offset((page - 1) * page_size).limit(page_size)).all()
            ids = [r.id for r in rows]
            counts = dict(session.execute(select(ImageRecord.case_id, func.count()).where(
                ImageRecord.case_id.in_(ids)).group_by(ImageRecord.case_id)).all())
            tasks: dict[int, list[str]] = {}
            for case_id, task in session.execute(
                    select(ImageRecord.case_id, Prediction.task).join(Prediction, Prediction.image_id == ImageRecord.id)
                    .where(ImageRecord.case_id.in_(ids)).distinct().order_by(Prediction.task)):
                tasks.setdefault(case_id, []).append(task)
            flagged = set(session.scalars(select(Case.id).where(Case.id.in_(ids), _flagged(filters.task))))
            return [{"id": r.id, "reference": r.reference, "created_at": r.created_at, "created_by": r.created_by,
                     "status": r.status, "task": ", ".join(tasks.get(r.id, [])), "images": counts.get(r.id, 0),
                     "needs_review": r.id in flagged} for r in rows], int(total)

    def agreement(self, model_id: str | None = None, task: str | None = None) -> dict:
        """Agreement of predictions with reviewers' latest final labels: count, accuracy,
        Cohen's kappa and the confusion table (predicted x final) per model. Cells a reviewer
        excluded (:data:`EXCLUDED_LABELS`) are left out: no class was there to agree with."""
        from sklearn.metrics import cohen_kappa_score

        with self.session() as session:
            query = select(Prediction)
            if model_id:
                query = query.where(Prediction.model_id == model_id)
            if task:
                query = query.where(Prediction.task == task)
            finals: dict[tuple[int, int | None], str] = {}
            for review in session.scalars(select(Review).order_by(Review.id)):
                finals[(review.image_id, review.cell_id)] = review.final_label
            per_model: dict[str, list[tuple[str, str]]] = {}
            for prediction in session.scalars(query):
                final = finals.get((prediction.image_id, prediction.cell_id))
                if final is not None and final not in EXCLUDED_LABELS:
                    per_model.setdefault(prediction.model_id, []).append((prediction.label, final))
        out = {}
        for model, pairs in per_model.items():
            predicted, final = zip(*pairs)
            labels = sorted(set(predicted) | set(final))
            confusion = {p: {f: sum(1 for a, b in pairs if a == p and b == f) for f in labels} for p in labels}
            kappa = cohen_kappa_score(predicted, final) if len(set(predicted) | set(final)) > 1 else 1.0
            out[model] = {"n": len(pairs), "accuracy": sum(a == b for a, b in pairs) / len(pairs),
                          "kappa": float(kappa), "confusion": confusion}
        return out

    def audit_trail(self, case_id: int | None = None) -> list[AuditEvent]:
        """Audit events, oldest first (of one case, its images and their cells when ``case_id``
        is given)."""
        with self.session() as session:
            query = select(AuditEvent).order_by(AuditEvent.id)
            if case_id is not None:
                image_ids = list(session.scalars(select(ImageRecord.id).where(ImageRecord.case_id == case_id)))
                cell_ids = list(session.scalars(select(Cell.id).where(Cell.image_id.in_(image_ids))))
                query = query.where(((AuditEvent.entity == "case") & (AuditEvent.entity_id == case_id))
                                    | ((AuditEvent.entity == "image") & AuditEvent.entity_id.in_(image_ids))
                                    | ((AuditEvent.entity == "cell") & AuditEvent.entity_id.in_(cell_ids)))
            return list(session.scalars(query))

    def check(self, repair: bool = False) -> ConsistencyReport:
        """Find files no row refers to and rows whose file is missing; with ``repair`` the
        unreferenced files are deleted (rows are never deleted). Unreferenced files younger
        than :data:`REPAIR_MIN_AGE_S` are reported apart and kept: a save may still need them.
        A plain check scans the files after its read, so saves are not held up by the scan;
        a repair scans and deletes under the file lock, so no save can commit a reference to
        a file in between."""

        def report(referenced: set[str]) -> ConsistencyReport:
            present = self.files.all_files()
            cutoff = time.time() - REPAIR_MIN_AGE_S
            unreferenced = present.keys() - referenced
            recent = {p for p in unreferenced if present[p] > cutoff}
            orphans = sorted(unreferenced - recent)
            if repair:
                self.files.discard(orphans)
            return ConsistencyReport(orphans, sorted(referenced - present.keys()), sorted(recent), repaired=repair)

        def work(session: Session) -> ConsistencyReport:
            self._lock_files(session, exclusive=True)
            return report(self._referenced(session))

        if repair:
            return self._write(work)
        with self.session() as session:
            referenced = self._referenced(session)
        return report(referenced)
