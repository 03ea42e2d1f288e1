"""Shrink the run files kept in docs/results to what docs/RESULTS.md and ``deft report`` read.

- results.json: the training log (``log_history``: loss, learning rate, per-layer densities ... at every
  logging step) keeps only each step's ``step`` and ``train_density``, the "density during training" plot
  of the report. Everything else (config, metrics, the per-layer density report, times, versions) stays.
- energy.json: the per-module rows (``energy.layers``) go; the totals, ``by_op`` and ``by_component`` stay.

Run it on new results before committing them (it is idempotent); the full files stay in the run folders:

    python scripts/compact_results.py docs/results
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

KEEP_LOG = ("step", "train_density")


def compact(path: Path) -> bool:
    """Rewrite ``path`` compacted; True if it changed."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if path.name == "results.json" and "log_history" in data:
        data["log_history"] = [
            {k: h[k] for k in KEEP_LOG} for h in data["log_history"] if all(k in h for k in KEEP_LOG)
        ]
    elif path.name == "energy.json":
        data.get("energy", data).pop("layers", None)
    text = json.dumps(data, indent=2) + "\n"  # deft's own layout (deft.io.write_json)
    if text == path.read_text(encoding="utf-8"):
        return False
    path.write_text(text, encoding="utf-8")
    return True


def main(roots: list[str]) -> None:
    for root in roots or ["docs/results"]:
        for path in sorted(Path(root).rglob("*.json")):
            if path.name in ("results.json", "energy.json") and compact(path):
                print(f"compacted {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
