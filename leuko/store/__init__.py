"""The case log: SQLAlchemy store (SQLite by default, PostgreSQL for teams), files, exports."""

from leuko.store.db import StoreUnavailableError
from leuko.store.service import (CaseFilter, CaseStore, CellEntry, ConsistencyReport, ImageEntry, PermissionDenied,
                                 PredictionEntry, StoreError)

__all__ = ["CaseFilter", "CaseStore", "CellEntry", "ConsistencyReport", "ImageEntry", "PermissionDenied",
           "PredictionEntry", "StoreError", "StoreUnavailableError"]
