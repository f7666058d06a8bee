"""User-facing errors: each names the problem and how to fix it; the CLI prints them without a traceback."""

from __future__ import annotations


class SubjectopsError(Exception):
    def __init__(self, message: str, fix: str | None = None):
        self.message = message
        self.fix = fix
        super().__init__(message if not fix else f"{message}\n  fix: {fix}")


class ConfigError(SubjectopsError):
    """A params value, override or template cannot be used (named with its key before any work starts)."""


class SubjectError(SubjectopsError):
    """A subject directory or its images cannot be used."""


class ModelNotFoundError(SubjectopsError):
    """Base weights are neither on disk nor reachable."""
