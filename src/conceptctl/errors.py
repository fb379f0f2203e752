"""Errors users can act on.

Every error raised on purpose by conceptctl is a :class:`ConceptctlError`. Its message says what is
wrong in one line; ``hint`` says how to fix it. The CLI's single error boundary (``cli.main``)
prints both and exits non-zero; library users catch the class.
"""

from __future__ import annotations


class ConceptctlError(Exception):
    """A problem the user can fix. ``str(err)`` is one line; ``hint`` is optional advice."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(ConceptctlError):
    """An option or argument value is out of range or inconsistent with another."""

    exit_code = 2


class UnknownComponentError(ConceptctlError):
    """A name that no loaded plugin registered for this kind of component."""

    def __init__(self, kind: str, name: str, available: list[str]) -> None:
        listed = ", ".join(available) if available else "none"
        super().__init__(
            f"unknown {kind} {name!r}; available: {listed}",
            hint=f"run 'conceptctl plugins' to see which plugin registers each {kind}",
        )
        self.kind = kind
        self.name = name
        self.available = available


class PluginError(ConceptctlError):
    """A plugin is malformed: a misspelled hook, a duplicate or badly formed component name."""


class BackboneError(ConceptctlError):
    """A backbone cannot be found, read or loaded."""


class UnsafeFileError(ConceptctlError):
    """A pickle-based file was refused because it can run code when loaded."""


class OutputExistsError(ConceptctlError):
    """The output path exists and the user did not ask to overwrite it."""
