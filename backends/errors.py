"""One error type the UI knows how to show: a message and what to do next."""

from __future__ import annotations


class LabdeckError(Exception):
    """An error meant for the user: ``str(err)`` says what went wrong,
    ``err.hint`` says what to do about it. Never shown with a traceback."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message

    def render(self) -> str:
        return f"{self.message}\n{self.hint}" if self.hint else self.message


class ConfigError(LabdeckError):
    """The configuration file is malformed or holds unknown keys or values."""


class StoreError(LabdeckError):
    """The store cannot be read or written."""


class StoreCorruptError(StoreError):
    """A store file exists but cannot be parsed. It is never rewritten silently."""

    def __init__(self, path, detail: str) -> None:
        self.path = path
        super().__init__(
            f"Store file {path} is corrupt ({detail}). labdeck has not changed it.",
            f"Move it aside (it is renamed, not deleted) with: labdeck store move-aside '{path}'",
        )


class ProviderError(LabdeckError):
    """A provider cannot do what was asked (unknown provider, unsupported action, API failure)."""


class TransportError(LabdeckError):
    """A command, file transfer or port forward on an instance failed."""


class StateError(LabdeckError):
    """A state transition that the state machine does not allow."""


class NotFoundError(LabdeckError):
    """No record with that id (or id prefix)."""


class AmbiguousError(NotFoundError):
    """A name or id prefix that matches records of several users (or several records): the user picks."""
