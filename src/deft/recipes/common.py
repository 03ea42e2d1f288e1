"""What the recipes share: :class:`RunError`, reading a ``--config`` file, the versions every result
records."""

from __future__ import annotations

import dataclasses
import platform
from typing import Any

from ..errors import DeftError
from ..io import read_mapping


class RunError(DeftError, RuntimeError):
    """A run cannot start as asked (bad option combination, existing output, missing data)."""


def read_config(path: str, cls: type, what: str = "--config") -> dict[str, Any]:
    """The option values in a YAML / JSON file for the arguments dataclass ``cls``; an unknown option (or a
    file that cannot be read) is one RunError naming ``what`` and the file."""
    try:
        data = read_mapping(path, what)
    except (OSError, ValueError) as e:
        raise RunError(str(e)) from None
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise RunError(f"{what} {path}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return data


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
