"""The case log: SQLAlchemy store (SQLite by default, PostgreSQL for teams), files, exports."""

from leuko.store.db import StoreUnavailableError
from leuko.store.models import REFERENCE_MAX_CHARS
from leuko.store.service import (DUPLICATE, EXCLUDED_LABELS, NO_LEUKOCYTE, NOT_LEUKOCYTE, CaseFilter, CaseStore,
                                 CellEntry, ConsistencyReport, ImageEntry, PermissionDenied, PredictionEntry,
                                 StoreError, counted_labels)

__all__ = ["DUPLICATE", "EXCLUDED_LABELS", "NO_LEUKOCYTE", "NOT_LEUKOCYTE", "REFERENCE_MAX_CHARS", "CaseFilter",
           "CaseStore", "CellEntry", "ConsistencyReport", "ImageEntry", "PermissionDenied", "PredictionEntry",
           "StoreError", "StoreUnavailableError", "counted_labels"]
