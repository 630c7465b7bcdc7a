"""Content-addressed files under ``$LEUKO_HOME/files``: images, CAMs and masks.

A file is stored once under ``<first two hex digits>/<sha256><suffix>``, written to a
temporary name, flushed to disk and renamed into place, so a reader never sees a partial
file. Rows are committed only after their files exist (see :mod:`leuko.store.service`).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from contextlib import suppress
from pathlib import Path
from typing import Iterable


class FileStore:
    """Files addressed by the sha256 of their content; paths are relative to ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, relative: str) -> Path:
        return self.root / relative

    def put(self, data: bytes, suffix: str, created: list[str] | None = None) -> tuple[str, str]:
        """Store ``data``; returns (relative path, sha256). Storing the same bytes twice only
        refreshes the file's modification time, so that a consistency repair sees it as in use
        by a save in progress; paths written by this call are appended to ``created``."""
        digest = hashlib.sha256(data).hexdigest()
        relative = f"{digest[:2]}/{digest}{suffix}"
        self.keep(relative, data, created)
        return relative, digest

    def keep(self, relative: str, data: bytes, created: list[str] | None = None) -> None:
        """Make sure ``data``, stored by :meth:`put` at ``relative``, is there: refresh the
        file's modification time, or write it again (atomically) if it has gone, appending
        ``relative`` to ``created`` then. Unlike :meth:`put` it does not hash ``data`` again."""
        target = self.root / relative
        with suppress(FileNotFoundError):
            if target.is_file() and target.stat().st_size == len(data):
                os.utime(target)
                return
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

    def discard(self, relatives: Iterable[str]) -> None:
        """Delete these files; the caller has made sure that no committed row refers to them."""
        for relative in relatives:
            (self.root / relative).unlink(missing_ok=True)

    def all_files(self) -> dict[str, float]:
        """Every stored file (partial temporaries included): relative path to modification
        time (seconds since the epoch). A file that vanishes while being listed is left out."""
        if not self.root.is_dir():
            return {}
        found = {}
        for path in self.root.rglob("*"):
            try:
                if path.is_file():
                    found[path.relative_to(self.root).as_posix()] = path.stat().st_mtime
            except FileNotFoundError:
                continue
        return found
