"""Dataclass fields whose help text becomes the CLI's ``--help`` (read by ``deft.cli``)."""
from __future__ import annotations

from dataclasses import field
from typing import Any


def help_field(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)
