"""The scripts in examples/ run as their docstrings say (a few steps, exit code 0, real output)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_plain_loop_example_runs():
    r = subprocess.run(
        [sys.executable, str(EXAMPLES / "plain_loop.py"), "--steps", "2", "--batch-size", "8", "--dev-rows", "32"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(re.findall(r"^step +\d+ +task [\d.]+ +alpha x density [\d.]+$", r.stdout, flags=re.MULTILINE)) == 2
    acc, dens = re.search(r"dev accuracy ([\d.]+)% on 32 rows, dev density ([\d.]+)%", r.stdout).groups()
    assert 0 <= float(acc) <= 100 and 0 < float(dens) <= 100
    assert "encoder.layer.5" in r.stdout  # the per-layer table of the real 6-layer MiniLM


@pytest.mark.slow  # 25-40 s on a 2-core CPU: loads the real MiniLM, trains 2 steps, evaluates 32 rows
def test_deft_trainer_example_runs():
    r = subprocess.run(
        [sys.executable, str(EXAMPLES / "deft_trainer.py"), "--steps", "2", "--batch-size", "8", "--dev-rows", "32"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    steps = re.findall(
        r"^step +(\d+) +task loss [\d.]+ +density loss [\d.]+ +train density ([\d.]+)%$", r.stdout, flags=re.MULTILINE
    )
    assert [s for s, _ in steps] == ["1", "2"]
    acc, dens = re.search(r"dev accuracy ([\d.]+)% on 32 rows, dev density ([\d.]+)% after 2 steps", r.stdout).groups()
    # 32 rows: accuracy is a multiple of 1/32; GELU leaves almost every MLP entry non-zero
    assert round(float(acc) * 32 / 100, 2).is_integer() and 50 < float(dens) <= 100
    assert "encoder.layer.5" in r.stdout  # the per-layer table of the real 6-layer MiniLM
    assert "LOAD REPORT" not in r.stdout + r.stderr and "FutureWarning" not in r.stderr
