"""The case log: SQLAlchemy store (SQLite by default, PostgreSQL for teams), files, exports."""

from leuko.store.db import StoreUnavailableError
from leuko.store.service import (CaseFilter, CaseStore, CellInput, ConsistencyReport, ImageInput, PermissionDenied,
                                 PredictionInput, StoreError)

__all__ = ["CaseFilter", "CaseStore", "CellInput", "ConsistencyReport", "ImageInput", "PermissionDenied",
           "PredictionInput", "StoreError", "StoreUnavailableError"]
