"""The one exception type of :mod:`deft.data`."""

from __future__ import annotations

from os import PathLike

from ..errors import DeftError


class DataError(DeftError, ValueError):
    """Bad input data or a bad data option.

    Messages name where the problem is, so a user can open the file and fix it: ``path:LINE: what is
    wrong`` for a file, or the option at fault (``source='local' needs data_dir``). It subclasses
    ``ValueError`` so callers that already catch that keep working.
    """

    @classmethod
    def at(cls, path: str | PathLike[str], line: int, what: str) -> DataError:
        """``path:line: what`` — the compiler-style location editors and terminals can jump to."""
        return cls(f"{path}:{line}: {what}")
