"""Exceptions that carry the CLI exit code they map to.

The CLI turns a `HardenError` into one line on stderr and its exit code, so the
library raises these for anything the user can fix (bad path, wrong URI, data that
does not fit the model) and lets genuine bugs surface as ordinary exceptions.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_ERROR = 2
EXIT_NOTHING_SCANNABLE = 3
EXIT_USAGE = 4


class HardenError(Exception):
    """A problem with the user's input or environment: one clear line, exit 2."""

    exit_code = EXIT_ERROR


class ModelLoadError(HardenError):
    """The model could not be found, read or trusted."""


class UnsafeModelError(ModelLoadError):
    """The artifact needs pickle, which is refused unless explicitly allowed."""


class DataError(HardenError):
    """The data could not be read or does not fit the model."""


class TrackingError(HardenError):
    """MLflow could not be reached or refused an operation."""
