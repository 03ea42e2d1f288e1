"""Atomic writes: a crash or Ctrl-C mid-write never leaves a truncated results file behind."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import ConfigError, MissingFileError


def _umask() -> int:
    # per call, since a program may change it. Linux shows it in /proc without touching it; elsewhere
    # os.umask can only be read by setting it, so it is set straight back
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike, *, directory: bool = False) -> None:
    """Give ``path`` the mode a plain ``open()`` (or ``mkdir``) would have: 0666 (0777) minus the umask.

    ``tempfile.mkstemp`` / ``mkdtemp`` create 0600 / 0700 on purpose, and a rename keeps that mode, so
    results written through a temp file would otherwise be private to their owner.
    """
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def apply_umask_tree(root: str | os.PathLike[str]) -> None:
    """:func:`apply_umask` on a folder and everything in it (safetensors writes its files 0600 too)."""
    mask = _umask()
    for folder, _dirs, files in os.walk(root):
        os.chmod(folder, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o666 & ~mask)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` to a temp file in the target's folder, then ``os.replace`` it over ``path``.

    The file ends up with the mode the user's umask gives new files (not mkstemp's 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        apply_umask(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_files(folder: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """``write(scratch)`` into a scratch folder inside ``folder``, then ``os.replace`` each file it wrote into
    ``folder``: for savers that write several files of their own (peft's ``save_pretrained``), every file
    appears whole. The files get the user's umask (safetensors writes 0600). Returns ``folder``."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=out, prefix=".save-"))
    try:
        write(scratch)
        for f in scratch.iterdir():
            if f.is_file():
                apply_umask(f)
                os.replace(f, out / f.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out


def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


def _jsonable(o: Any) -> Any:
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    return str(o)


def read_mapping(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """A YAML (.yaml/.yml) or JSON file holding a mapping; errors name ``what`` and the file."""
    p = Path(path)
    if not p.exists():
        raise MissingFileError(f"{what} {p}: no such file")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as e:  # yaml.YAMLError / json.JSONDecodeError both carry the position
        raise ConfigError(f"{what} {p}: cannot parse: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {p}: expected a mapping of names to values")
    return data
