"""Errors a user can act on.

Every failure a user can cause (a bad file, a bad option, a model edgelvm does not know) is raised as an
:class:`EdgeLVMError` subclass whose message says *what* is wrong, *where* (file, field, line) and *how to fix it*.
The CLI prints these without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class EdgeLVMError(Exception):
    """Base class: a problem the user can fix. ``str(err)`` is the whole message."""

    def __init__(self, problem: str, *, where: str | Path | None = None, fix: str | None = None) -> None:
        self.problem = problem
        self.where = str(where) if where is not None else None
        self.fix = fix
        parts = [f"{self.where}: {problem}" if self.where else problem]
        if fix:
            parts.append(f"Fix: {fix}")
        super().__init__("\n".join(parts))


class BundleError(EdgeLVMError):
    """A bundle directory is missing files, tampered with, or of an unknown format version."""


class ManifestError(BundleError):
    """``edgelvm.json`` is malformed or has an unsupported ``format_version``."""


class ImageError(EdgeLVMError):
    """An image cannot be read or has the wrong shape / dtype."""


class PromptTooLongError(EdgeLVMError):
    """The prompt (text plus image tokens) plus the requested new tokens exceed the bundle's context."""


class UnsupportedModelError(EdgeLVMError):
    """The checkpoint's ``model_type`` has no adapter."""


class ExportError(EdgeLVMError):
    """Export cannot proceed (bad output directory, missing processor files, parity failure, ...)."""


class DatasetError(EdgeLVMError):
    """A dataset (jsonl + images) is malformed, empty, or references missing files."""


class BackendError(EdgeLVMError):
    """A requested runtime backend / execution provider is not available here."""


class ConfigError(EdgeLVMError):
    """An option or config value is out of range or inconsistent."""
