"""A report people can read: one self-contained HTML file and a Markdown twin, from finished runs.

Inputs are run folders as deft writes them: a single run (``results.json``), a ``deft compare`` folder
(``compare.json`` + one sub-folder per run) or a ``deft sweep`` folder (``sweep.jsonl`` + one sub-folder
per point); a folder holding several of those is searched one level down. A run folder that also holds
an ``energy.json`` (``deft energy --adapter RUN/adapter --output RUN``) adds the energy columns and plot.

Runs that differ only in their seed form one *setting*: the table shows its mean ± std over seeds, as the
paper does. The Density Change % of a setting is measured against the setting with ``alpha = 0`` and
otherwise the same options (the PEFT baseline), when the inputs contain one.
"""

from __future__ import annotations

import base64
import datetime as _dt
import functools
import html
import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.report import DensityReport
from ..errors import DeftError
from ..io import write_text
from .tradeoff import mean_std

# options that do not change what is trained (or only where it is written)
_NOT_SETTING = ("seed", "output", "resume", "overwrite", "quiet")
# options of the density loss: a setting without them (alpha = 0) is the PEFT baseline of one with them
_LOSS_OPTIONS = ("alpha", "loss", "eps", "beta", "granularity", "alpha_warmup")
_LABEL_ORDER = (
    "model",
    "task",
    "method",
    "alpha",
    "loss",
    "eps",
    "beta",
    "granularity",
    "alpha_warmup",
    "lr",
    "epochs",
    "lora_r",
    "target_modules",
)


# options results.json records since the library's DensityConfig / MethodConfig became deft train's option table;
# a run written before trained at their library defaults (it had no flag for them), so those fill its config and
# old and new runs of one setting stay one setting
_ADDED_OPTIONS = {
    "density": ("point", "adaptive_gamma", "adaptive_mix", "adaptive_every", "distill_temperature"),
    "peft": ("adapter_non_linearity",),
}


@functools.cache
def _implied_options() -> dict[str, Any]:
    from ..methods.config import MethodConfig
    from ..train.config import DensityConfig

    defaults = {"density": DensityConfig(), "peft": MethodConfig()}
    return {name: getattr(defaults[group], name) for group, names in _ADDED_OPTIONS.items() for name in names}


class ReportError(DeftError, ValueError):
    """Nothing to report (no finished run under the given folders)."""


@dataclass
class Run:
    dir: Path
    results: dict[str, Any]
    energy: dict[str, Any] | None = None

    @property
    def config(self) -> dict[str, Any]:
        return {**_implied_options(), **self.results["config"]}


@dataclass
class Setting:
    key: tuple
    runs: list[Run]
    label: str = ""
    varying: dict[str, Any] = field(default_factory=dict)  # the options that tell it apart from other settings
    baseline: Setting | None = None
    duplicates: list[Run] = field(default_factory=list)  # same options *and* seed as a run already counted
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def config(self) -> dict[str, Any]:
        return self.runs[0].config


# ---------------------------------------------------------------------------------------------- collecting
def _load_run(d: Path) -> Run:
    res = json.loads((d / "results.json").read_text(encoding="utf-8"))
    energy = None
    if (d / "energy.json").exists():
        e = json.loads((d / "energy.json").read_text(encoding="utf-8"))
        energy = e.get("energy", e)
    return Run(d, res, energy)


def find_runs(paths: Iterable[str | Path]) -> list[Run]:
    """Every finished run under ``paths`` (single runs, compare and sweep folders), each once, in order."""
    found: dict[Path, Run] = {}

    def visit(d: Path, depth: int) -> bool:
        if (d / "results.json").exists():
            found.setdefault(d.resolve(), _load_run(d))
            return True
        hit = False
        if (d / "sweep.jsonl").exists():
            for row in read_rows(d / "sweep.jsonl"):
                sub = d / row["dir"]
                if (sub / "results.json").exists():
                    found.setdefault(sub.resolve(), _load_run(sub))
                    hit = True
        if depth > 0 and d.is_dir():  # compare folders, and folders of folders
            for sub in sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")):
                if sub.name in ("checkpoints", "adapter", "figures"):
                    continue
                hit = visit(sub, depth - 1) or hit
        return hit

    for p in paths:
        p = Path(p)
        if not p.exists():
            raise ReportError(f"{p}: no such folder")
        if not visit(p, 2):
            raise ReportError(f"{p}: no finished run (results.json) in it or in its sub-folders")
    return list(found.values())


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a sweep.jsonl, as :func:`deft.recipes.sweep.sweep` appends them (a torn last line from a crash is
    skipped; a re-added point keeps its last row)."""
    rows: dict[str, dict[str, Any]] = {}
    p = Path(path)
    if not p.exists():
        return []
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(r, dict) and "point" in r:
            rows[r["point"]] = r
    return list(rows.values())


def _fmt_value(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def group_settings(runs: Sequence[Run]) -> list[Setting]:
    """Runs grouped by every option but the seed; labels name the options that differ between settings."""
    by_key: dict[tuple, Setting] = {}
    for r in runs:
        key = _setting_key(r.config)
        by_key.setdefault(key, Setting(key, [])).runs.append(r)
    settings = list(by_key.values())
    configs = [s.config for s in settings]
    all_keys = dict.fromkeys(k for c in configs for k in c)  # runs of older versions may lack newer options
    varying = [k for k in all_keys if k not in _NOT_SETTING and len({json.dumps(c.get(k)) for c in configs}) > 1]
    varying.sort(key=lambda k: (_LABEL_ORDER.index(k) if k in _LABEL_ORDER else len(_LABEL_ORDER), k))
    for s in settings:
        c = s.config
        s.varying = {k: c.get(k) for k in varying}
        kind = "PEFT" if not c.get("alpha") else "DEFT"
        shown = [k for k in varying if k != "method" and (kind == "DEFT" or k not in _LOSS_OPTIONS or k == "alpha")]
        extra = " ".join(
            f"{'α' if k == 'alpha' else k}={model_short(c[k]) if k == 'model' else _fmt_value(c.get(k))}" for k in shown
        )
        method = c.get("method", "?")
        s.label = f"{kind} {method}" + (f" {extra}" if extra else ("" if kind == "PEFT" else f" α={c['alpha']:g}"))
        s.runs.sort(key=lambda r: r.config.get("seed", 0))
        # the same options and seed twice (a compare folder next to the sweep it was copied from) would
        # count one result twice in the mean and shrink the std: keep the first
        kept: dict[Any, Run] = {}
        for r in s.runs:
            if r.config.get("seed") in kept:
                s.duplicates.append(r)
            else:
                kept[r.config.get("seed")] = r
        s.runs = list(kept.values())
    for s in settings:
        s.stats = _stats(s)
    baselines = {_base_key(s.config): s for s in settings if not s.config.get("alpha")}
    for s in settings:
        b = baselines.get(_base_key(s.config))
        s.baseline = b if b is not s else None
    settings.sort(
        key=lambda s: (
            s.config.get("model", ""),
            s.config.get("task", ""),
            s.config.get("method", ""),
            s.config.get("alpha", 0.0),
            s.label,
        )
    )
    return settings


def _setting_key(config: dict[str, Any]) -> tuple:
    """Every option but the seed; an unset option (None) equals a missing one; at alpha = 0 the density
    loss's other options train nothing, so PEFT runs that differ only there are one setting."""
    skip = set(_NOT_SETTING) | (set(_LOSS_OPTIONS) - {"alpha"} if not config.get("alpha") else set())
    return tuple(
        sorted((k, json.dumps(v, sort_keys=True)) for k, v in config.items() if k not in skip and v is not None)
    )


def _base_key(config: dict[str, Any]) -> tuple:
    """The options a DEFT setting shares with its PEFT baseline: all but the seed and the density loss's."""
    return tuple(
        sorted(
            (k, json.dumps(v, sort_keys=True))
            for k, v in config.items()
            if k not in _NOT_SETTING and k not in _LOSS_OPTIONS and v is not None
        )
    )


def _stats(s: Setting) -> dict[str, float]:
    m, ms = mean_std(r.results.get("metric") for r in s.runs)
    d, ds = mean_std(r.results["density"]["overall"] for r in s.runs)
    e, es = mean_std(r.energy["ratio"] for r in s.runs if r.energy)
    return {
        "metric": m,
        "metric_std": ms,
        "density": d,
        "density_std": ds,
        "energy_ratio": e,
        "energy_ratio_std": es,
        "energy_runs": sum(1 for r in s.runs if r.energy),
        "trainable_percent": s.runs[0].results.get("trainable_percent", float("nan")),
    }


def density_change(s: Setting) -> float:
    if s.baseline is None or not s.baseline.stats["density"] > 0:
        return float("nan")
    b = s.baseline.stats["density"]
    return (b - s.stats["density"]) / b * 100.0


# ---------------------------------------------------------------------------------------------- table
def _pm(mean: float, std: float, scale: float = 100.0, digits: int = 2) -> str:
    if math.isnan(mean):
        return "–"
    return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def table_rows(settings: Sequence[Setting]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the paper-style table."""
    metric_names = sorted({s.runs[0].results.get("main_metric", "metric") for s in settings})
    metric = metric_names[0] if len(metric_names) == 1 else "metric"
    head = ["setting", "seeds", f"{metric} (%)", "density (%)", "Density Change %", f"Δ {metric} (pts)", "trainable %"]
    has_energy = any(s.stats["energy_runs"] for s in settings)
    if has_energy:
        head.append("energy ratio")
    rows = []
    for s in settings:
        st = s.stats
        if s.baseline is not None:
            change = f"{density_change(s):.2f}"
            dm = 100 * (st["metric"] - s.baseline.stats["metric"])
            dmetric = "–" if math.isnan(dm) else f"{dm:+.2f}"
        else:
            change = dmetric = "baseline" if not s.config.get("alpha") else "–"
        row = [
            s.label,
            str(len(s.runs)),
            _pm(st["metric"], st["metric_std"]),
            _pm(st["density"], st["density_std"]),
            change,
            dmetric,
            f"{st['trainable_percent']:.3f}",
        ]
        if has_energy:
            n = st["energy_runs"]
            if n > 1:
                row.append(
                    _pm(st["energy_ratio"], st["energy_ratio_std"], scale=1.0, digits=3)
                    + ("" if n == len(s.runs) else f" ({n} runs)")
                )
            else:  # a std of one run would read as "no spread"
                row.append(f"{st['energy_ratio']:.3f} (1 run)" if n else "–")
        rows.append(row)
    return head, rows


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- figures
def _point(s: Setting) -> dict[str, Any]:
    """A setting as one point of a trade-off curve."""
    return {
        "alpha": s.config.get("alpha", 0.0),
        "density": s.stats["density"],
        "density_std": s.stats["density_std"],
        "metric": s.stats["metric"],
        "metric_std": s.stats["metric_std"],
    }


def _figures(settings: Sequence[Setting], fig_dir: Path) -> list[tuple[str, Path, str]]:
    """(title, png path, caption) of every figure; each is also written as SVG next to the PNG."""
    from . import report_plots
    from .plots import layerwise_density

    figs: list[tuple[str, Path, str]] = []
    groups: dict[tuple[str, str], list[Setting]] = {}
    for s in settings:
        groups.setdefault((s.config.get("model", "?"), s.config.get("task", "?")), []).append(s)
    for gi, ((model, task), ss) in enumerate(groups.items()):
        series: dict[str, list[dict[str, Any]]] = {}
        with_base: set[tuple[str, int]] = set()
        for s in ss:
            if not s.config.get("alpha"):
                continue
            name = _series_name(s)
            series.setdefault(name, []).append(_point(s))
            # the PEFT baseline is the alpha = 0 end of every curve built on it
            if s.baseline is not None and (name, id(s.baseline)) not in with_base:
                with_base.add((name, id(s.baseline)))
                series[name].append(_point(s.baseline))
        for s in ss:  # baselines without any DEFT setting on top of them
            if not s.config.get("alpha") and not any(x.baseline is s for x in ss):
                series.setdefault(_series_name(s), []).append(_point(s))
        metric = ss[0].runs[0].results.get("main_metric", "metric")
        png, _ = report_plots.tradeoff(
            series,
            fig_dir / f"tradeoff_{gi}",
            metric_name=metric,
            title=f"{model_short(model)} / {task}: {metric} vs density",
        )
        figs.append(
            (
                f"Trade-off: {model_short(model)} / {task}",
                png,
                f"{metric.capitalize()} against MLP activation density, one point per setting (mean ± std over seeds), "
                "labelled with α; the dashed step line joins the Pareto-optimal settings "
                "(none is both sparser and better).",
            )
        )

        curves: dict[str, list[tuple[float, float]]] = {}
        for s in ss:
            per_step: dict[float, list[float]] = {}
            for r in s.runs:
                for h in r.results.get("log_history", []):
                    if "train_density" in h and "step" in h:
                        per_step.setdefault(float(h["step"]), []).append(float(h["train_density"]))
            if per_step:
                curves[s.label] = [(k, statistics.fmean(v)) for k, v in sorted(per_step.items())]
        if curves:
            png, _ = report_plots.density_curves(
                curves, fig_dir / f"density_steps_{gi}", title=f"{model_short(model)} / {task}: density during training"
            )
            figs.append(
                (
                    f"Density during training: {model_short(model)} / {task}",
                    png,
                    "Running train density (share of non-zero MLP activations over the batches of each "
                    "logging interval), mean over seeds.",
                )
            )

        if len(ss) <= 8:
            reps = {s.label: [DensityReport.from_dict(r.results["density"]) for r in s.runs] for s in ss}
            if len({len(v[0].layers) for v in reps.values()}) == 1:
                path = layerwise_density(
                    reps, fig_dir / f"layerwise_{gi}.png", title=f"{model_short(model)} / {task}: layerwise density"
                )
                layerwise_density(reps, fig_dir / f"layerwise_{gi}.svg", title=f"{model_short(model)} / {task}")
                figs.append(
                    (
                        f"Layerwise density: {model_short(model)} / {task}",
                        path,
                        "Density of each MLP layer on the dev set (error bars: std over seeds).",
                    )
                )

    energies = {f"{s.label} s{r.config.get('seed', 0)}": r.energy for s in settings for r in s.runs if r.energy}
    if energies:
        chosen = dict(list(energies.items())[:8])
        png, _ = report_plots.energy_breakdown(chosen, fig_dir / "energy")
        figs.append(
            (
                "Energy breakdown",
                png,
                "Energy per example on a dense accelerator and on a zero-skipping one (hatched), by "
                "operation type; ×r is the zero-skip / dense ratio. mlp_down is W2, whose input sparsity is "
                "what DEFT changes.",
            )
        )
    return figs


def _series_name(s: Setting) -> str:
    """A curve over alpha: the setting's method and the other options that differ (eps/beta only with alpha>0)."""
    parts = [str(s.config.get("method", "?"))]
    for k, v in s.varying.items():
        if k in ("alpha", "method") or (k in _LOSS_OPTIONS and not s.config.get("alpha")):
            continue
        parts.append(f"{k}={model_short(v) if k == 'model' else _fmt_value(v)}")
    return " ".join(parts)


def model_short(model: str) -> str:
    """The last path component of a model path (test and cache paths are long)."""
    return Path(model).name if ("/" in model and Path(model).exists()) else model


# ---------------------------------------------------------------------------------------------- writing
def _versions(runs: Sequence[Run]) -> list[tuple[str, dict[str, str]]]:
    """(runs label, versions) for each distinct set of package versions."""
    seen: dict[str, list[str]] = {}
    vals: dict[str, dict[str, str]] = {}
    for r in runs:
        v = r.results.get("versions", {})
        k = json.dumps(v, sort_keys=True)
        seen.setdefault(k, []).append(r.dir.name)
        vals[k] = v
    if len(seen) == 1:
        return [("all runs", next(iter(vals.values())))]
    return [(", ".join(names), vals[k]) for k, names in seen.items()]


def _config_of(s: Setting) -> dict[str, Any]:
    c = {k: v for k, v in s.config.items() if k not in _NOT_SETTING}
    c["seeds"] = [r.config.get("seed") for r in s.runs]
    return c


def _energy_by_op(s: Setting) -> list[list[str]] | None:
    """Per operation type: input non-zero %, dense and zero-skip µJ per example, ratio (mean over runs)."""
    energies = [r.energy for r in s.runs if r.energy]
    if not energies:
        return None
    ops: dict[str, list[tuple[float, float, float]]] = {}
    for e in energies:
        n = max(1, e.get("examples") or 1)
        for op, v in e["by_op"].items():
            nz = v.get("input_nonzero_fraction", float("nan")) if v.get("observed", True) else float("nan")
            ops.setdefault(op, []).append((v["dense_pj"] / n / 1e6, v["zero_skip_pj"] / n / 1e6, nz))
    rows = []
    for op, vals in ops.items():
        d, z, nz = (statistics.fmean(v[i] for v in vals) for i in range(3))
        rows.append(
            [op, "n/a" if math.isnan(nz) else f"{100 * nz:.2f}", f"{d:.3f}", f"{z:.3f}", f"{z / d:.3f}" if d else "–"]
        )
    return rows


def _energy_summary(settings: Sequence[Setting]) -> list[list[str]]:
    """One row per setting with energy: W2 input density, per-example energy and the ratio (mean over runs)."""
    rows = []
    for s in settings:
        energies = [r.energy for r in s.runs if r.energy]
        if not energies:
            continue
        n = [max(1, e.get("examples") or 1) for e in energies]
        down = [e["by_op"].get("mlp_down") for e in energies]
        mean = statistics.fmean
        w2 = "–"
        if all(down):
            w2 = (
                f"{mean(d['dense_pj'] / k / 1e6 for d, k in zip(down, n, strict=True)):.3f} → "
                f"{mean(d['zero_skip_pj'] / k / 1e6 for d, k in zip(down, n, strict=True)):.3f}"
            )
        rows.append(
            [
                s.label,
                str(len(energies)),
                f"{100 * mean(d['input_nonzero_fraction'] for d in down):.2f}" if all(down) else "–",
                w2,
                f"{mean(e['dense_pj'] / k / 1e6 for e, k in zip(energies, n, strict=True)):.3f}",
                f"{mean(e['zero_skip_pj'] / k / 1e6 for e, k in zip(energies, n, strict=True)):.3f}",
                f"{mean(e['ratio'] for e in energies):.3f}",
            ]
        )
    return rows


_ENERGY_SUMMARY_HEAD = [
    "setting",
    "runs",
    "W2 input non-zero %",
    "W2 µJ/example (dense → zero-skip)",
    "dense µJ/example",
    "zero-skip µJ/example",
    "energy ratio",
]
_ENERGY_HEAD = ["operation", "input non-zero %", "dense µJ/example", "zero-skip µJ/example", "ratio"]
_ENERGY_NOTE = (
    "W2 is the MLP down-projection (mlp_down): its input is the MLP activation, the sparsity DEFT "
    "trains for; a zero-skipping accelerator skips the MACs and weight fetches of its zero inputs. "
    "Attention matmul operands are not observed and priced dense."
)
_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1.2em;color:#222;line-height:1.45}
h1{border-bottom:2px solid #d62728;padding-bottom:.2em}h2{margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:1em 0;font-size:.92em}th,td{border:1px solid #ccc;padding:.35em .6em;
text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
tr:nth-child(even) td{background:#fafafa}figure{margin:1.2em 0}figure img{max-width:100%;height:auto;
border:1px solid #eee}figcaption{font-size:.88em;color:#555;max-width:800px}
pre{background:#f6f8fa;padding:.8em;overflow-x:auto;font-size:.82em}.note{color:#555;font-size:.9em}
details{margin:.5em 0}summary{cursor:pointer;font-weight:600}
"""


def _html_table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def _data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")


def build_report(
    run_dirs: Sequence[str | Path], out_dir: str | Path, *, title: str = "DEFT report"
) -> tuple[Path, Path]:
    """Write ``out_dir/report.html`` (self-contained) and ``out_dir/report.md`` (+ ``figures/``); returns both."""
    runs = find_runs(run_dirs)
    out = Path(out_dir)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    settings = group_settings(runs)
    head, rows = table_rows(settings)
    figs = _figures(settings, fig_dir)
    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    data_labels = sorted({str(r.results.get("data", "?")) for r in runs})
    sources = [str(Path(p)) for p in run_dirs]
    hw = next((r.energy.get("config") for r in runs if r.energy), None)
    explain = (
        "Mean ± std over seeds. Density: share of non-zero MLP activations on the dev set (lower = "
        "sparser). Density Change % = (density_PEFT − density_DEFT) / density_PEFT × 100 against the "
        "α = 0 setting with otherwise equal options; Δ is the metric change in points against it."
    )
    if hw:
        explain += (
            " Energy ratio: energy of a zero-skipping accelerator over a dense one (lower = more saved), "
            "from each run's energy.json."
        )

    # ---- markdown
    md = [
        f"# {title}",
        "",
        f"Generated {now} from {len(runs)} run(s) in {', '.join(sources)}. Data: {'; '.join(data_labels)}.",
        "",
        "## Results",
        "",
        markdown_table(head, rows),
        "",
        explain,
        "",
    ]
    md += ["## Figures", ""]
    for t, png, cap in figs:
        md += [
            f"### {t}",
            "",
            f"![{t}]({png.relative_to(out).as_posix()})",
            "",
            f"{cap} (SVG: `{png.with_suffix('.svg').relative_to(out).as_posix()}`)",
            "",
        ]
    energy_rows = _energy_summary(settings)
    per_op = [(s, r) for s in settings if (r := _energy_by_op(s))]
    if energy_rows:
        md += [
            "## Energy on a zero-skipping accelerator",
            "",
            markdown_table(_ENERGY_SUMMARY_HEAD, energy_rows),
            "",
            _ENERGY_NOTE,
            "",
        ]
        for s, erows in per_op:
            md += [
                f"<details><summary>{s.label}: by operation</summary>",
                "",
                markdown_table(_ENERGY_HEAD, erows),
                "",
                "</details>",
                "",
            ]
        md += ["Hardware: `" + json.dumps(hw) + "`", ""]
    md += ["## Configurations", ""]
    for s in settings:
        md += [f"### {s.label}", "", "Runs: " + ", ".join(f"`{r.dir}`" for r in s.runs), ""]
        if s.duplicates:
            md += [
                "Not counted (same options and seed as a run above): " + ", ".join(f"`{r.dir}`" for r in s.duplicates),
                "",
            ]
        md += ["```json", json.dumps(_config_of(s), indent=2), "```", ""]
    md += ["## Package versions", ""]
    for who, v in _versions(runs):
        md += [f"{who}:", "", markdown_table(["package", "version"], [[k, str(x)] for k, x in v.items()]), ""]
    md_path = write_text(out / "report.md", "\n".join(md))

    # ---- html
    e = html.escape
    h = [
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{e(title)}</title>"
        f"<meta name='viewport' content='width=device-width, initial-scale=1'><style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        f"<p class='note'>Generated {e(now)} from {len(runs)} run(s) in {e(', '.join(sources))}. "
        f"Data: {e('; '.join(data_labels))}.</p>",
        "<h2>Results</h2>",
        _html_table(head, rows, "results"),
        f"<p class='note'>{e(explain)}</p>",
        "<h2>Figures</h2>",
    ]
    for t, png, cap in figs:
        h.append(
            f"<figure><img alt='{e(t)}' src='{_data_uri(png)}'><figcaption><b>{e(t)}.</b> {e(cap)}"
            "</figcaption></figure>"
        )
    if energy_rows:
        h += [
            "<h2>Energy on a zero-skipping accelerator</h2>",
            _html_table(_ENERGY_SUMMARY_HEAD, energy_rows, "energy"),
            f"<p class='note'>{e(_ENERGY_NOTE)}</p>",
        ]
        for s, erows in per_op:
            h.append(
                f"<details><summary>{e(s.label)}: by operation</summary>"
                f"{_html_table(_ENERGY_HEAD, erows, 'energy')}</details>"
            )
        h.append(f"<details><summary>Hardware model</summary><pre>{e(json.dumps(hw, indent=2))}</pre></details>")
    h.append("<h2>Configurations</h2>")
    for s in settings:
        h.append(
            f"<details><summary>{e(s.label)} ({len(s.runs)} run{'s' if len(s.runs) != 1 else ''})</summary>"
            f"<p class='note'>Runs: {e(', '.join(str(r.dir) for r in s.runs))}</p>"
            + (
                f"<p class='note'>Not counted (same options and seed as a run above): "
                f"{e(', '.join(str(r.dir) for r in s.duplicates))}</p>"
                if s.duplicates
                else ""
            )
            + f"<pre>{e(json.dumps(_config_of(s), indent=2))}</pre></details>"
        )
    h.append("<h2>Package versions</h2>")
    for who, v in _versions(runs):
        h += [f"<p>{e(who)}:</p>", _html_table(["package", "version"], [[k, str(x)] for k, x in v.items()])]
    h.append("</body></html>")
    html_path = write_text(out / "report.html", "\n".join(h))
    return html_path, md_path
