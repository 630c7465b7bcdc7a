"""The case log's tables (SQLAlchemy 2.0 typed ORM).

No table has a patient-name field: a case carries a pseudonymous reference only.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint, false
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


USERNAME_MAX_CHARS = 64
"""Longest account name the ``users`` table holds."""
REFERENCE_MAX_CHARS = 64
"""Longest case reference the ``cases`` table holds (PostgreSQL refuses longer ones)."""
NAME_MAX_CHARS = 255
"""Longest original file name an ``images`` row holds."""


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(moment: datetime) -> datetime:
    """``moment`` with its UTC time zone: SQLite returns the stored UTC times without one,
    PostgreSQL with it."""
    return moment.replace(tzinfo=moment.tzinfo or timezone.utc)


class Base(DeclarativeBase):
    pass


class User(Base):
    """A local account; ``role`` is analyst, reviewer or admin; passwords are argon2 hashes."""

    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(USERNAME_MAX_CHARS), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    failed_logins: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Case(Base):
    """One analysis session: a pseudonymous reference, notes, clinical values and status
    (new, reviewed or signed)."""

    __tablename__ = "cases"
    id: Mapped[int] = mapped_column(primary_key=True)
    reference: Mapped[str] = mapped_column(String(REFERENCE_MAX_CHARS), unique=True)
    notes: Mapped[str] = mapped_column(Text, default="")
    clinical: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    created_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    status: Mapped[str] = mapped_column(String(16), default="new", index=True)
    count_disagrees: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    """Whether the blood count and the images disagreed when the case was analysed
    (:mod:`leuko.concordance`): such a case needs review like a flagged result."""
    images: Mapped[list["ImageRecord"]] = relationship(back_populates="case", cascade="all, delete-orphan",
                                                       order_by="ImageRecord.id")
    sign_off: Mapped["SignOff | None"] = relationship(back_populates="case", cascade="all, delete-orphan")


class ImageRecord(Base):
    """An uploaded image, stored content-addressed by its sha256; a single-cell crop keeps its
    cell's morphometrics here (a field's are per cell)."""

    __tablename__ = "images"
    id: Mapped[int] = mapped_column(primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"), index=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    original_name: Mapped[str] = mapped_column(String(NAME_MAX_CHARS))
    stored_path: Mapped[str] = mapped_column(String(255))
    size_bytes: Mapped[int] = mapped_column(Integer)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(8))
    morphometrics: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    case: Mapped[Case] = relationship(back_populates="images")
    cells: Mapped[list["Cell"]] = relationship(back_populates="image", cascade="all, delete-orphan", order_by="Cell.index")
    predictions: Mapped[list["Prediction"]] = relationship(back_populates="image", cascade="all, delete-orphan")
    reviews: Mapped[list["Review"]] = relationship(back_populates="image", cascade="all, delete-orphan",
                                                   order_by="Review.id")


class Cell(Base):
    """A leukocyte found in a field image: box (pixels), crop file and morphometrics."""

    __tablename__ = "cells"
    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    x: Mapped[int] = mapped_column(Integer)
    y: Mapped[int] = mapped_column(Integer)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    touches_border: Mapped[bool] = mapped_column(Boolean, default=False)
    crop_path: Mapped[str | None] = mapped_column(String(255), nullable=True)
    morphometrics: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    image: Mapped[ImageRecord] = relationship(back_populates="cells")


class Prediction(Base):
    """A model's calibrated answer for an image (crop) or one cell of a field. ``shift_score``
    (higher: less like the model's training images), ``unfamiliar`` (the score is above the
    model's threshold) and ``not_applicable`` (why the task's question does not fit the cell)
    are ``None`` when not measured, as for every prediction logged before they existed."""

    __tablename__ = "predictions"
    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    cell_id: Mapped[int | None] = mapped_column(ForeignKey("cells.id", ondelete="CASCADE"), nullable=True)
    model_id: Mapped[str] = mapped_column(String(100), index=True)
    weights_sha256: Mapped[str] = mapped_column(String(64))
    task: Mapped[str] = mapped_column(String(32), index=True)
    probabilities: Mapped[dict] = mapped_column(JSON)
    label: Mapped[str] = mapped_column(String(32), index=True)
    confidence: Mapped[float] = mapped_column(Float)
    needs_review: Mapped[bool] = mapped_column(Boolean, index=True)
    cam_path: Mapped[str | None] = mapped_column(String(255), nullable=True)
    mask_path: Mapped[str | None] = mapped_column(String(255), nullable=True)
    latency_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    shift_score: Mapped[float | None] = mapped_column(Float, nullable=True)
    unfamiliar: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    not_applicable: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    image: Mapped[ImageRecord] = relationship(back_populates="predictions")


class Review(Base):
    """A reviewer's final label for an image or a cell; the latest one counts."""

    __tablename__ = "reviews"
    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    cell_id: Mapped[int | None] = mapped_column(ForeignKey("cells.id", ondelete="CASCADE"), nullable=True)
    reviewer: Mapped[str] = mapped_column(String(64), index=True)
    final_label: Mapped[str] = mapped_column(String(32), index=True)
    comment: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    image: Mapped[ImageRecord] = relationship(back_populates="reviews")


class SignOff(Base):
    """A reviewer's signature on a case, with the impression they wrote when signing."""

    __tablename__ = "sign_offs"
    __table_args__ = (UniqueConstraint("case_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"))
    signed_by: Mapped[str] = mapped_column(String(64))
    signed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    impression: Mapped[str] = mapped_column(Text, default="")
    case: Mapped[Case] = relationship(back_populates="sign_off")


class AuditEvent(Base):
    """Append-only record of who did what and when, with old and new values."""

    __tablename__ = "audit_events"
    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(32))
    entity: Mapped[str] = mapped_column(String(32))
    entity_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    old: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    new: Mapped[dict | None] = mapped_column(JSON, nullable=True)
