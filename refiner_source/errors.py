"""The one base of the errors a user is shown: str() of each is the one line to show, and the
command line catches this class alone, to print that line and exit 1."""

from __future__ import annotations


class RefinerSourceError(Exception):
    """Something the user can fix; str() is the one line that says what and how."""


class ConfigError(RefinerSourceError):
    """A setting is missing or malformed."""
