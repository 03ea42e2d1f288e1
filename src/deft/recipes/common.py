"""What the recipes share: :class:`RunError`, reading a ``--config`` file, the versions every result
records."""

from __future__ import annotations

import platform
from typing import Any

from ..errors import ConfigError, DeftError
from ..fields import check_known, convert, options
from ..io import read_mapping


class RunError(DeftError, RuntimeError):
    """A run cannot start as asked (bad option combination, existing output, missing data)."""


def read_config(path: str, cls: type, what: str = "--config") -> dict[str, Any]:
    """The option values in a YAML / JSON file for the arguments dataclass ``cls``, by their flat names
    (:func:`deft.fields.options`), each checked against its option's type and choices; an unknown option, a
    wrong value or a file that cannot be read is one RunError naming ``what`` and the file."""
    try:
        data = read_mapping(path, what)
    except (OSError, ValueError) as e:
        raise RunError(str(e)) from None
    where = f"{what} {path}"
    opts = options(cls)
    try:
        check_known(cls, data, where)
        return {k: convert(opts[k], v, where) for k, v in data.items()}
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
