"""What deft prints: its own lines and one progress bar per run, not the libraries' chatter.

transformers prints a LOAD REPORT for every freshly initialised task head (deft always adds a fresh head,
and loads the trained one right after when there is one), draws a bar for every file it loads or saves,
and transformers / peft warn about each other's deprecated APIs. None of it is something a deft user can
act on, so deft's model loads run inside :func:`quiet_loading`: it silences that for the load only and
restores the caller's settings afterwards (a library user's own transformers logging is left alone). The
command line goes one step further for the whole command (:func:`cli_session`). ``deft -v`` / ``--verbose``
or ``DEFT_VERBOSE=1`` shows all of it again.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Iterator

_verbose: bool | None = None  # None: follow DEFT_VERBOSE


def set_verbose(on: bool | None) -> None:
    """Show (True) or hide (False) the libraries' load reports and warnings; None: follow ``DEFT_VERBOSE``."""
    global _verbose
    _verbose = on


def is_verbose() -> bool:
    if _verbose is not None:
        return _verbose
    return os.environ.get("DEFT_VERBOSE", "").lower() not in ("", "0", "false", "no")


@contextlib.contextmanager
def _transformers_quiet() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Silence transformers' load reports and progress bars and Future/DeprecationWarnings inside the block
    (nothing is silenced when verbose). Also usable as a decorator: ``@quiet_loading()``."""
    if is_verbose():
        yield
        return
    with _transformers_quiet(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


@contextlib.contextmanager
def cli_session(verbose: bool = False) -> Iterator[None]:
    """The command line's output for one command: quiet libraries (unless ``verbose``), and each distinct
    warning printed once per process as one ``deft: warning: ...`` line instead of Python's two-line form
    with a source line (``deft compare`` builds the same model for every run and would repeat it), and
    only by the first process of a torchrun / accelerate launch."""
    previous = _verbose
    set_verbose(verbose or is_verbose())
    shown: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None):  # warnings.showwarning's signature
        text = str(message)
        # under torchrun every process would print the same warning: the first one speaks for all
        if text in shown or int(os.environ.get("RANK", "0")) != 0:
            return
        shown.add(text)
        kind = "" if issubclass(category, UserWarning) else f"{category.__name__}: "
        print(f"deft: warning: {kind}{text}", file=file or sys.stderr)

    try:
        with warnings.catch_warnings():
            if not is_verbose():
                warnings.showwarning = show
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                with _transformers_quiet():
                    yield
            else:
                yield
    finally:
        set_verbose(previous)
