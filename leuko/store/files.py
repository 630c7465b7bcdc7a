"""Content-addressed files under ``$LEUKO_HOME/files``: images, CAMs and masks.

A file is stored once under ``<first two hex digits>/<sha256><suffix>``, written to a
temporary name, flushed to disk and renamed into place, so a reader never sees a partial
file. Rows are committed only after their files exist (see :mod:`leuko.store.service`).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


class FileStore:
    """Files addressed by the sha256 of their content; paths are relative to ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, relative: str) -> Path:
        return self.root / relative

    def put(self, data: bytes, suffix: str, created: list[str] | None = None) -> tuple[str, str]:
        """Store ``data``; returns (relative path, sha256). Storing the same bytes twice is a
        no-op; paths written by this call are appended to ``created`` (for clean-up)."""
        digest = hashlib.sha256(data).hexdigest()
        relative = f"{digest[:2]}/{digest}{suffix}"
        target = self.root / relative
        if target.is_file() and target.stat().st_size == len(data):
            return relative, digest
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=".partial-")
        try:
            with os.fdopen(handle, "wb") as stream:
                stream.write(data)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        if created is not None:
            created.append(relative)
        return relative, digest

    def discard(self, relatives: list[str]) -> None:
        """Delete files this process just created for a save that did not commit."""
        for relative in relatives:
            (self.root / relative).unlink(missing_ok=True)

    def all_files(self) -> set[str]:
        """Relative paths of every stored file (partial temporaries included)."""
        if not self.root.is_dir():
            return set()
        return {p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file()}
