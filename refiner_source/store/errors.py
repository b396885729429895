"""What the store raises when it cannot serve: the database did not answer (StoreUnavailable, a 503),
or answers but cannot serve as set up (StoreMisconfigured, a line for the operator)."""

from __future__ import annotations

import os

from refiner_source.errors import RefinerSourceError


class StoreUnavailable(Exception):
    """The database did not answer (down, locked too long, connection cut): callers answer 503."""


class StoreMisconfigured(StoreUnavailable, RefinerSourceError):
    """The database answers but cannot serve: no schema yet, a SQLite folder missing or not writable.
    str() is the whole line for the operator, with the resolved path."""


def sqlite_file_problem(path: str, reason: str, what: str = "SQLite database") -> str:
    """Why the file at `path` (the database, or its writer lock beside it) cannot be opened, as one line
    naming the folder or file at fault."""
    folder = os.path.dirname(path) or "."
    if not os.path.exists(folder):
        return f"the folder {folder} does not exist, so the {what} {path} cannot be created (check DATABASE_URL, or create it)"
    if not os.path.isdir(folder):
        return f"{folder} is not a folder, so the {what} {path} cannot be created there (check DATABASE_URL)"
    if not os.access(folder, os.W_OK | os.X_OK):
        return (
            f"the folder {folder} is not writable by this user, so the {what} {path} cannot be written "
            "(SQLite writes its database, -wal, -shm and writer lock files there)"
        )
    if os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK):
        return f"the {what} {path} is not readable and writable by this user"
    return f"cannot open the {what} {path}: {reason}"
