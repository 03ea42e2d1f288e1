"""The command-line options both examples take; each script adds its own and does its own training."""

from __future__ import annotations

import argparse


def add_training_options(ap: argparse.ArgumentParser, *, steps: int) -> None:
    """--steps (default ``steps``), --alpha, --batch-size, --lr, --dev-rows and --seed."""
    ap.add_argument("--steps", type=int, default=steps, help="optimizer steps")
    ap.add_argument("--alpha", type=float, default=1.0, help="weight of the density loss (0 = plain PEFT)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--dev-rows", type=int, default=128, help="dev rows for accuracy and density")
    ap.add_argument("--seed", type=int, default=0)
