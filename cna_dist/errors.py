"""The two ways cna-dist fails, mapped to the CLI's exit codes (2: bad input, 1: run-time failure)."""

from __future__ import annotations


class BadInput(Exception):
    """The user's input is wrong: exit 2, nothing written. The message names file, field and value."""

    def __init__(self, message: str, *, source: str | None = None, field: str | None = None):
        self.source = source
        self.field = field
        prefix = ""
        if source:
            prefix += f"{source}: "
        if field:
            prefix += f"{field}: "
        super().__init__(prefix + message)


class RunFailure(Exception):
    """Something broke while running (a dead actor, a storage error): exit 1, reported, never silent."""


def shown(value: object, limit: int = 200) -> str:
    """A value for an error message: its repr, cut to `limit` characters without building the whole of a huge one."""
    import reprlib

    short = reprlib.Repr()
    short.maxstring = short.maxother = limit
    short.maxlist = short.maxdict = short.maxtuple = 12
    return short.repr(value)
