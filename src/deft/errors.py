"""The one error base of deft.

Every error deft raises for something the user can fix (a bad option, file, model or data row)
subclasses :class:`DeftError`, and its message names the thing at fault in one line. The command line
prints a ``DeftError`` as that one line; anything else is a bug in deft and gets a real traceback.
Subclasses also derive from the builtin a caller would expect (``ValueError``, ``FileNotFoundError``),
so code that already catches those keeps working.
"""

from __future__ import annotations


class DeftError(Exception):
    """Base class of deft's user-facing errors."""


class ConfigError(DeftError, ValueError):
    """An option has a value deft cannot use (the message names the option)."""


class MissingFileError(DeftError, FileNotFoundError):
    """A file or folder deft was pointed at does not exist (the message names the path)."""


class MissingExtraError(DeftError, ImportError):
    """An optional dependency of deft is not installed (the message names the pip command)."""


class UnknownNameError(DeftError, KeyError):
    """A name (a layer, a site) that matches nothing in the model; the message lists what exists."""

    def __str__(self) -> str:
        # KeyError's str() is the repr of its argument (quotes, escaped newlines); a message should read as one
        return str(self.args[0]) if self.args else ""
