"""Dataclass fields whose help text becomes the CLI's ``--help`` (read by ``deft.cli``)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import field
from typing import Any


def help_field(text: str, *, choices: Sequence[Any] | None = None, **kw: Any) -> Any:
    """A dataclass field with ``--help`` text; ``choices`` become the CLI flag's allowed values (argparse
    rejects anything else naming the flag, and ``--config`` files are checked against them too)."""
    metadata: dict[str, Any] = {"help": text}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    return field(metadata=metadata, **kw)
