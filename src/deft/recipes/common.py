"""What the recipes share: :class:`RunError`, reading a ``--config`` file, the versions every result
records."""

from __future__ import annotations

import platform
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import ConfigError, DeftError
from ..fields import check_known, convert, options
from ..io import read_mapping


class RunError(DeftError, RuntimeError):
    """A run cannot start as asked (bad option combination, existing output, missing data)."""


def read_config(path: str, cls: type, what: str = "--config", extra: Sequence[str] = ()) -> dict[str, Any]:
    """The option values in a YAML / JSON file for the arguments dataclass ``cls``, by their flat names
    (:func:`deft.fields.options`), each checked against its option's type and choices; an unknown option, a
    wrong value or a file that cannot be read is one RunError naming ``what`` and the file. Keys in ``extra``
    (``preset``) are passed on as they are, for the caller to resolve."""
    try:
        data = read_mapping(path, what)
    except (OSError, ValueError) as e:
        raise RunError(str(e)) from None
    return check_values(data, cls, f"{what} {path}", extra)


def check_values(data: Mapping[str, Any], cls: type, where: str, extra: Sequence[str] = ()) -> dict[str, Any]:
    """:func:`read_config`'s checks on values already read: one RunError naming ``where``."""
    opts = options(cls)
    try:
        check_known(cls, {k: v for k, v in data.items() if k not in extra}, where)
        return {k: v if k in extra else convert(opts[k], v, where) for k, v in data.items()}
    except ConfigError as e:
        raise RunError(str(e)) from None


def versions() -> dict[str, str]:
    """deft's, torch's, transformers', peft's and Python's versions and the machine, for results.json."""
    import peft
    import torch
    import transformers

    from ..version import __version__

    return {
        "deft": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {platform.system()}",
    }
