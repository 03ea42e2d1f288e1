"""``deft report``: one self-contained HTML page and a Markdown report from finished runs (the report itself
is :mod:`deft.analysis.report`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..fields import help_field as _h
from .common import RunError


@dataclass
class ReportArgs:
    """Arguments of ``deft report``: one self-contained HTML page and a Markdown report from finished runs."""

    run_dirs: list[str] = field(
        default_factory=list,
        metadata={
            "help": "run, compare or sweep folders (results.json / compare.json / sweep.jsonl)",
            "positional": True,
        },
    )
    output: str = _h("folder for report.html, report.md and figures/", default="runs/report")
    title: str = _h("report title", default="DEFT report")


def report(args: ReportArgs) -> tuple[Path, Path]:
    from ..analysis.report import build_report

    if not args.run_dirs:
        raise RunError("name at least one run, compare or sweep folder (RUN_DIRS)")
    html_path, md_path = build_report(args.run_dirs, args.output, title=args.title)
    print(f"report: {html_path}\n        {md_path}")
    return html_path, md_path
