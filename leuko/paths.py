"""Where things live: the repository's shipped models, the user's LEUKO_HOME and the data."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_MODELS = REPO_ROOT / "models"


def leuko_home() -> Path:
    """The user's data folder: ``$LEUKO_HOME``, default ``.leuko/`` in the working directory."""
    return Path(os.environ.get("LEUKO_HOME", ".leuko")).expanduser().resolve()


def user_models_dir() -> Path:
    """Models the user trained and registered (``$LEUKO_HOME/models``)."""
    return leuko_home() / "models"


def default_data_root() -> Path:
    """Development data: ``$LEUKO_DATA``, else ``../shared/data`` beside the repository."""
    env = os.environ.get("LEUKO_DATA")
    return Path(env).expanduser().resolve() if env else (REPO_ROOT.parent / "shared" / "data")
