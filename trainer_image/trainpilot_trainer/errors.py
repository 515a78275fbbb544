"""Errors the trainer turns into exit codes."""

from __future__ import annotations


class ConfigError(Exception):
    """The trial cannot run as configured; retrying cannot help.

    The message is one line that starts with the field at fault (`hyperparameters.data_path: ...`)
    and says what is allowed; the entry point prints it and exits with EXIT_INVALID_CONFIG.
    """
