"""Helpers the benchmark scripts share: interleaved timing, the machine description, SST-2 text, JSON output.

Every script times the sides it compares in the same run, alternating them (A, B, A, B, ...), and keeps
the fastest timing of each: on a shared machine other processes can only ever add time, and alternating
means both sides see the same background load. The load average goes into the JSON so a reader can
judge how noisy the run was.
"""

from __future__ import annotations

import csv
import os
import platform
import time
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch.utils.benchmark import Timer

from deft.io import write_json as deft_write_json


def loadavg() -> float | None:
    """1-minute load average (None where the OS has none): how busy the shared machine was."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def machine(device: str = "cpu") -> dict[str, Any]:
    """The machine a benchmark ran on, with the load average at the time of the call."""
    info: dict[str, Any] = {
        "device": device,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        # other processes' load on a shared machine: timings are the fastest of interleaved rounds
        "loadavg_1min": loadavg(),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


# "cpu" counts only the time this process was on a CPU: on a machine shared with other jobs, time spent
# descheduled (the bulk of the noise at a load average above the core count) drops out. Only meaningful
# with one torch thread: with more, idle OpenMP threads spin and their spinning counts too.
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def add_timing_options(ap: Any) -> None:
    """--threads, --clock and --out on the argparse parser ``ap``: the options of every CPU timing script."""
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's choice); 1 on a busy shared machine, where every "
        "multi-threaded op waits for its other thread to be scheduled",
    )
    ap.add_argument(
        "--clock",
        choices=tuple(CLOCKS),
        default="wall",
        help="wall time, or CPU time of this process (with --threads 1: time spent descheduled by "
        "other jobs drops out)",
    )
    ap.add_argument("--out", default=None, help="write the results as JSON here")


def interleaved(
    fns: Sequence[Callable[[], Any]],
    rounds: int,
    *,
    min_run_time: float | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> list[list[float]]:
    """Seconds per call of every function in ``fns``, ``rounds`` timings each, taken in turn (A, B, A, B...).

    ``min_run_time=None``: each timing is one call (for calls of ~10 ms and more, where one call is
    already a stable measurement). Otherwise each timing is the fastest block of a
    ``blocked_autorange(min_run_time)`` (for sub-millisecond calls). ``clock``: see :data:`CLOCKS`.
    Returns ``times[i][round]``; take the ``min`` (other processes only ever add time) or a median.
    """
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            if min_run_time is None:
                t0 = clock()
                fn()
                times[i].append(clock() - t0)
            else:
                m = Timer("fn()", globals={"fn": fn}, timer=clock).blocked_autorange(min_run_time=min_run_time)
                times[i].append(min(m.times))
    return times


def median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def sst2_sentences(n: int, split: str = "dev") -> list[str]:
    """``n`` sentences of deft's built-in SST-2 sample (repeated when it has fewer), in file order."""
    path = resources.files("deft") / "data" / "builtin" / f"sst2_{split}.tsv"
    with path.open(encoding="utf-8") as f:
        rows = [r["sentence"] for r in csv.DictReader(f, delimiter="\t")]
    return (rows * (n // len(rows) + 1))[:n]


def write_json(path: str | os.PathLike | None, out: dict[str, Any], *, quiet: bool = False) -> Path | None:
    """Write ``out`` to ``path`` (nothing when None) and, unless ``quiet``, say so. Returns the path written.

    Through :func:`deft.io.write_json`, as deft's own results: the write is atomic (a long run stopped
    mid-write leaves no truncated JSON behind), missing folders are made, and tensor / numpy scalars,
    paths and objects with ``to_dict`` are written as plain values.
    """
    if not path:
        return None
    written = deft_write_json(path, out)
    if not quiet:
        print(f"wrote {written}")
    return written
