"""Regenerate deft's built-in SST-2 sample (src/deft/data/builtin/sst2_{train,dev}.tsv).

train: 3,000 rows drawn with ``random.Random(0).sample`` from GLUE SST-2 train.tsv (67,349 rows), kept
in their original file order; dev: the full GLUE SST-2 dev.tsv (872 rows), copied unchanged.
Rows are copied byte for byte, header included, so the sample parses exactly like the full files.

    python scripts/make_builtin_sst2.py [GLUE_DIR]   # default GLUE_DIR: ../shared/data/glue (beside the checkout)
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

N_TRAIN, SEED = 3000, 0
OUT = Path(__file__).resolve().parents[1] / "src" / "deft" / "data" / "builtin"


def main(glue_dir: Path) -> None:
    src = glue_dir / "SST-2"
    # Split on b"\n" only and keep the endings, so the copy is byte-identical row by row.
    header, *rows = (src / "train.tsv").read_bytes().splitlines(keepends=True)
    rows = [r if r.endswith(b"\n") else r + b"\n" for r in rows]  # a last row without newline stays a row
    picked = sorted(random.Random(SEED).sample(range(len(rows)), N_TRAIN))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "sst2_train.tsv").write_bytes(header + b"".join(rows[i] for i in picked))
    (OUT / "sst2_dev.tsv").write_bytes((src / "dev.tsv").read_bytes())
    print(f"wrote {N_TRAIN} of {len(rows)} train rows and the dev file to {OUT}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "shared" / "data" / "glue")
