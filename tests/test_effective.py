"""Effective density: per-layer thresholds travel with the model, are applied exactly, and set the baseline.

Checks against independent expectations: outputs against the down-projection computed by hand on a
zeroed input, densities against counts done by hand, iso-accuracy against curves worked out on paper.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel

import deft
from deft.analysis.tradeoff import iso_accuracy, lowest_density_within, metric_at_density
from deft.core.threshold import save_thresholds
from deft.errors import DeftError
from deft.sparse import (
    apply_thresholds,
    calibrate_threshold_curve,
    calibrate_thresholds,
    load_thresholds,
    sparse_modules,
    sparsify,
    unsparsify,
)
from deft.testing import tiny_config

from conftest import tiny_run_flags

DOWN = ["encoder.layer.0.output.dense", "encoder.layer.1.output.dense"]


def _relu_bert():
    torch.manual_seed(0)
    return AutoModel.from_config(tiny_config("bert", hidden_act="relu")).eval()


def _batches(n: int = 3, seed: int = 1, batch: int = 4, seq: int = 9):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 100, (batch, seq), generator=g)
        mask = torch.ones_like(ids)
        mask[0, seq - 3 :] = 0  # padding must not be counted
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _capture(model, names):
    """Raw input and output of each named module, per call (hooks registered before any masking)."""
    seen = {n: [] for n in names}
    handles = []
    for n in names:
        m = model.get_submodule(n)
        handles.append(m.register_forward_pre_hook(lambda _m, a, n=n: seen[n].append([a[0].detach().clone()])))
        handles.append(m.register_forward_hook(lambda _m, a, o, n=n: seen[n][-1].append(o.detach().clone())))
    return seen, handles


# ---------------------------------------------------------------------------------------------- applying
def test_thresholded_forward_equals_zeroing_by_hand():
    model = _relu_bert()
    batches = _batches()
    th = {DOWN[0]: 0.05, DOWN[1]: 0.12}
    with torch.no_grad():
        dense = [model(**b).last_hidden_state for b in batches]
    seen, handles = _capture(model, DOWN)
    with apply_thresholds(model, th), torch.no_grad():
        masked = [model(**b).last_hidden_state for b in batches]
    for h in handles:
        h.remove()
    hand_active = hand_total = 0
    hand_exact = {n: 0 for n in DOWN}
    for name in DOWN:
        w, b = model.get_submodule(name).weight, model.get_submodule(name).bias
        for (h, out), batch in zip(seen[name], batches, strict=True):
            # what W2 must compute: its input with every |h| <= t set to 0, then the plain affine map
            zeroed = torch.where(h.abs() > th[name], h, torch.zeros_like(h))
            torch.testing.assert_close(out, F.linear(zeroed, w, b))
            valid = batch["attention_mask"].bool()
            hand_active += int((h.abs() > th[name])[valid].sum())
            hand_exact[name] += int((h != 0)[valid].sum())
            hand_total += int(valid.sum()) * h.shape[-1]
    assert not all(torch.allclose(a, b) for a, b in zip(dense, masked, strict=True))  # the thresholds do change outputs

    # sparsify's thresholded kernel computes the same model
    sparsify(model, mode="threshold", threshold=th, max_density=1.0)
    with torch.no_grad():
        for b, ref in zip(batches, masked, strict=True):
            torch.testing.assert_close(model(**b).last_hidden_state, ref, atol=1e-5, rtol=1e-5)
    unsparsify(model)

    # effective density of that pass = the hand count; the exact-zero density of the raw inputs beside it
    report = deft.measure_density(model, batches, thresholds=th)
    per_layer = hand_total // 2
    assert report.thresholds == th
    assert report.overall == pytest.approx(hand_active / hand_total)  # both layers have the same entry count
    assert [layer.exact_density for layer in report.layers] == pytest.approx([hand_exact[n] / per_layer for n in DOWN])
    assert report.exact_overall == pytest.approx(sum(hand_exact.values()) / hand_total)
    assert report.overall < report.exact_overall < 1.0  # ReLU: some exact zeros, thresholds remove more
    same = deft.measure_density(model, batches, threshold=th)  # a mapping as threshold= means the same
    assert same.overall == report.overall
    # the old scalar path is untouched: no thresholds, no exact column
    plain = deft.measure_density(model, batches, point="down_input")
    assert plain.thresholds is None and plain.exact_overall is None
    assert "exact-0" in report.table() and "exact-0" not in plain.table()


def test_density_report_round_trips_and_reads_old_results():
    model = _relu_bert()
    report = deft.measure_density(model, _batches(1), thresholds={DOWN[1]: 0.1})
    d = json.loads(json.dumps(report.to_dict()))
    back = deft.DensityReport.from_dict(d)
    assert back.thresholds == {DOWN[0]: 0.0, DOWN[1]: 0.1}
    assert back.overall == report.overall and back.exact_overall == pytest.approx(report.exact_overall)
    # a results.json written before thresholds existed: no "thresholds", no "exact_density"
    old = {k: v for k, v in d.items() if k not in ("thresholds", "exact_overall")}
    old["layers"] = [{k: v for k, v in layer.items() if k != "exact_density"} for layer in d["layers"]]
    legacy = deft.DensityReport.from_dict(old)
    assert legacy.thresholds is None and legacy.exact_overall is None and legacy.overall == report.overall


def test_calibrate_threshold_curve_equals_calibrate_thresholds():
    model = _relu_bert()
    batches = _batches(2)
    curve = calibrate_threshold_curve(model, batches, [0.5, 0.2])
    for d in (0.5, 0.2):
        assert curve[d] == calibrate_thresholds(model, batches, d)
    assert all(curve[0.2][n] >= curve[0.5][n] for n in DOWN)  # sparser target, higher threshold


# ---------------------------------------------------------------------------------------------- artifact
def _lora_classifier(model_dir):
    from transformers import AutoModelForSequenceClassification

    from deft.methods import MethodConfig, apply_method

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    model = apply_method(
        base, MethodConfig(method="lora", target_modules="mlp"), task_type="SEQ_CLS", warn_frozen_pooler=False
    )
    with torch.no_grad():  # a trained adapter: LoRA B is zero at init, which would hide a naming slip
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    return model.eval()


def test_thresholds_round_trip_through_the_adapter_folder(tiny_model_dir, tmp_path):
    import copy

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = dict(tok(["a fine film", "dull and far too long to sit through"], padding=True, return_tensors="pt"))
    peft_model = _lora_classifier(tiny_model_dir)
    merged = copy.deepcopy(peft_model).merge_and_unload()
    # calibrated on the merged model, as deft train writes them
    th = calibrate_thresholds(merged, [batch], 0.4)
    assert set(th) == {f"bert.{n}" for n in DOWN}
    save_thresholds(tmp_path / "adapter", th)

    # read back from the adapter folder and from the run folder: the same values, valid on both models
    for where in (tmp_path / "adapter", tmp_path, tmp_path / "adapter" / "thresholds.json"):
        assert load_thresholds(where, merged) == th
        assert load_thresholds(where, peft_model) == th
    loaded = load_thresholds(tmp_path, merged)
    sparsify(merged, mode="threshold", threshold=loaded, max_density=1.0)
    assert {n: m.threshold for n, m in sparse_modules(merged).items()} == th  # applied unchanged
    with torch.no_grad():
        served = merged(**batch).logits
        with apply_thresholds(peft_model, load_thresholds(tmp_path, peft_model)):
            unmerged = peft_model(**batch).logits
        dense = peft_model(**batch).logits
    torch.testing.assert_close(unmerged, served, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(dense, served)


@pytest.mark.parametrize(
    "content, needle",
    [
        (
            '{"bert.encoder.layer.0.output.dense": 0.1, "bert.encoder.layer.7.output.dense": 0.2}',
            "bert.encoder.layer.7.output.dense",
        ),
        ('{"bert.encoder.layer.0.output.dense": NaN}', "bert.encoder.layer.0.output.dense"),
        ('{"bert.encoder.layer.1.output.dense": -0.5}', "bert.encoder.layer.1.output.dense"),
        ('{"bert.encoder.layer.1.output.dense": "0.5"}', "bert.encoder.layer.1.output.dense"),
        ("[0.1, 0.2]", "mapping"),
        ('{"bert.encoder.layer.0.output', "JSON"),
    ],
)
def test_bad_thresholds_file_is_one_clear_error(tiny_model_dir, tmp_path, content, needle):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    f = tmp_path / "adapter" / "thresholds.json"
    f.parent.mkdir()
    f.write_text(content)
    with pytest.raises(DeftError) as err:
        load_thresholds(tmp_path / "adapter", model)
    msg = str(err.value)
    assert needle in msg and str(f) in msg and "\n" not in msg
    if "layer.7" in content:  # the unknown site, and the sites the model does have
        assert "bert.encoder.layer.0.output.dense" in msg.split("its sites are")[1]
        assert "layer.0" not in msg.split("its sites are")[0]


def test_missing_thresholds_file_is_named(tmp_path):
    with pytest.raises(DeftError, match="no thresholds.json"):
        load_thresholds(tmp_path)


# ---------------------------------------------------------------------------------------------- iso-accuracy
def test_lowest_density_within_max_drop_on_hand_made_curves():
    # reference 0.90, max drop 0.01: metrics >= 0.89 qualify
    curve = [(0.5, 0.90), (0.3, 0.895), (0.2, 0.889), (0.4, 0.91), (0.1, 0.70)]  # unsorted on purpose
    assert lowest_density_within(curve, 0.90, 0.01) == (0.3, 0.895)
    # a drop of exactly max_drop is within (floats: 0.90 - 0.01 is not exactly 0.89)
    assert lowest_density_within([(0.25, 0.89), (0.6, 0.9)], 0.90, 0.01) == (0.25, 0.89)
    # nothing within max drop -> None
    assert lowest_density_within([(0.2, 0.80), (0.1, 0.5)], 0.90, 0.01) is None
    assert lowest_density_within([], 0.90, 0.01) is None
    # ties in density: the better of the points there counts
    assert lowest_density_within([(0.2, 0.85), (0.2, 0.895), (0.3, 0.9)], 0.90, 0.01) == (0.2, 0.895)
    # a curve that is not monotone: a sparse point may qualify past a dip
    assert lowest_density_within([(0.1, 0.9), (0.2, 0.5), (0.3, 0.9)], 0.9, 0.0) == (0.1, 0.9)
    # NaN points are ignored
    assert lowest_density_within([(math.nan, 0.95), (0.4, math.nan), (0.6, 0.9)], 0.9, 0.0) == (0.6, 0.9)
    with pytest.raises(ValueError, match="max_drop"):
        lowest_density_within(curve, 0.9, -1)


def test_metric_at_density_interpolates_linearly():
    curve = [(0.4, 0.80), (0.2, 0.60), (0.1, 0.50)]
    assert metric_at_density(curve, 0.3) == pytest.approx(0.70)  # halfway between 0.2 and 0.4
    assert metric_at_density(curve, 0.15) == pytest.approx(0.55)
    assert metric_at_density(curve, 0.1) == pytest.approx(0.50)  # an end point itself
    assert metric_at_density(curve, 0.05) is None and metric_at_density(curve, 0.5) is None  # no extrapolation
    assert metric_at_density(curve, None) is None
    assert metric_at_density([(0.3, 0.7)], 0.3) == pytest.approx(0.7)
    assert metric_at_density([(0.3, 0.7)], 0.2) is None
    # ties: the best metric at a density is the curve's value there
    assert metric_at_density([(0.2, 0.5), (0.2, 0.7), (0.4, 0.9)], 0.3) == pytest.approx(0.8)


def test_iso_accuracy_of_several_kinds():
    curves = {
        "PEFT + thresholds": [(0.5, 0.88), (0.3, 0.875), (0.2, 0.84), (0.1, 0.70)],
        "DEFT": [(0.35, 0.878)],
        "DEFT + thresholds": [(0.3, 0.879), (0.2, 0.876), (0.1, 0.80)],
        "broken": [(0.4, 0.5)],
    }
    out = iso_accuracy(curves, reference=0.88, max_drop=0.005, matched_kind="PEFT + thresholds")
    assert out["matched_density"] == 0.3
    k = out["kinds"]
    assert (k["PEFT + thresholds"]["density"], k["PEFT + thresholds"]["metric"]) == (0.3, 0.875)
    assert (k["DEFT"]["density"], k["DEFT"]["metric"]) == (0.35, 0.878)
    assert k["DEFT"]["metric_at_matched_density"] is None  # one point, not at 0.3
    assert (k["DEFT + thresholds"]["density"], k["DEFT + thresholds"]["metric"]) == (0.2, 0.876)
    assert k["DEFT + thresholds"]["metric_at_matched_density"] == pytest.approx(0.879)
    assert k["PEFT + thresholds"]["metric_at_matched_density"] == pytest.approx(0.875)
    assert k["broken"] == {"density": None, "metric": None, "metric_at_matched_density": None, "points": 1}
    # the baseline never gets within max_drop: nothing to match
    none = iso_accuracy(
        {"PEFT + thresholds": [(0.2, 0.5)], "DEFT": [(0.3, 0.88)]}, 0.88, 0.005, matched_kind="PEFT + thresholds"
    )
    assert none["matched_density"] is None and none["kinds"]["DEFT"]["metric_at_matched_density"] is None
    assert none["kinds"]["DEFT"]["density"] == 0.3


# ---------------------------------------------------------------------------------------------- energy
def test_energy_prices_thresholded_entries_as_skipped():
    from deft.analysis.energy import EnergyReport, estimate_energy

    model = _relu_bert()
    batches = _batches()
    th = {DOWN[0]: 0.05, DOWN[1]: 0.12}
    seen, handles = _capture(model, DOWN)
    with apply_thresholds(model, th), torch.no_grad():
        for b in batches:
            model(**b)
    for h in handles:
        h.remove()
    plain = estimate_energy(model, batches)
    report = estimate_energy(model, batches, thresholds=th)
    assert report.thresholds == th
    for name in DOWN:
        (rec,) = [layer for layer in report.layers if layer.name == name]
        valid = [b["attention_mask"].bool() for b in batches]
        active = sum(int((h.abs() > th[name])[v].sum()) for (h, _), v in zip(seen[name], valid, strict=True))
        exact = sum(int((h != 0)[v].sum()) for (h, _), v in zip(seen[name], valid, strict=True))
        assert rec.op == "mlp_down" and rec.threshold == th[name]
        assert rec.act_in_nonzero == active and rec.act_in_exact_nonzero == exact
        assert rec.macs_nonzero == active * rec.out_features
    (l0,) = [layer for layer in plain.layers if layer.name == DOWN[0]]
    (t0,) = [layer for layer in report.layers if layer.name == DOWN[0]]
    assert l0.act_in_nonzero == t0.act_in_exact_nonzero  # layer 0 sees the same raw input either way
    assert report.zero_skip_pj < plain.zero_skip_pj and report.dense_pj == pytest.approx(plain.dense_pj)
    eff, ex = report.down_input_density()
    assert eff < ex and "effective density" in report.table() and plain.down_input_density() is None
    back = EnergyReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert back.thresholds == th and back.zero_skip_pj == pytest.approx(report.zero_skip_pj)


# ---------------------------------------------------------------------------------------------- compare
MARK = "zebra"  # one word-piece, in no row of the shipped SST-2 training sample: marks evaluation rows


def _sample(split: str, n: int) -> list[str]:
    from importlib.resources import files

    lines = (files("deft.data") / "builtin" / f"sst2_{split}.tsv").read_text(encoding="utf-8").splitlines()
    return lines[1 : n + 1]


def _write_glue(root, train: list[str] | None, dev: list[str]):
    d = root / "SST-2"
    d.mkdir(parents=True)
    for split, rows in (("train", train), ("dev", dev)):
        if rows is not None:
            (d / f"{split}.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return root


def _mark(row: str) -> str:
    sentence, label = row.rsplit("\t", 1)
    return f"{sentence} {MARK}\t{label}"


class _CalibrationSpy:
    """Wraps deft.sparse.calibrate_threshold_curve and keeps every token row it is given."""

    def __init__(self, monkeypatch):
        import deft.sparse

        self.rows: list[list[int]] = []
        self.calls = 0
        real = deft.sparse.calibrate_threshold_curve

        def spy(model, batches, *a, **kw):
            batches = list(batches)
            self.calls += 1
            for b in batches:
                for ids, m in zip(b["input_ids"], b["attention_mask"], strict=True):
                    self.rows.append(ids[m.bool()].tolist())
            return real(model, batches, *a, **kw)

        monkeypatch.setattr(deft.sparse, "calibrate_threshold_curve", spy)


def _flags(model_dir, glue, out, *extra):
    return tiny_run_flags(model_dir, glue, out, "--quiet", *extra)


@pytest.fixture(scope="module")
def compared(tiny_model_dir, tmp_path_factory):
    """One tiny `deft compare` on SST-2 rows whose dev rows all carry MARK, with calibration spied on."""
    from deft import cli

    root = tmp_path_factory.mktemp("cmp")
    glue = _write_glue(root / "glue", _sample("train", 48), [_mark(r) for r in _sample("dev", 32)])
    out = root / "cmp"
    mp = pytest.MonkeyPatch()
    spy = _CalibrationSpy(mp)
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    flags = [
        "compare",
        *_flags(tiny_model_dir, glue, out),
        "--alpha",
        "5",
        "--target-density",  # DEFT as the exact-zero loss: its runs get a "+ thresholds" curve of their own
        "none",
        "--seeds",
        "0",
        "--baseline-densities",
        "1.0",
        "0.5",
        "0.2",
        "--calib-samples",
        "40",
    ]
    try:
        with redirect_stdout(buf):
            rc = cli.main(flags)
    finally:
        mp.undo()
    assert rc == 0, buf.getvalue()
    return {"out": out, "glue": glue, "spy": spy, "stdout": buf.getvalue(), "flags": flags}


def test_calibration_never_reads_evaluation_rows(compared, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    (mark_id,) = tok(MARK, add_special_tokens=False)["input_ids"]
    spy = compared["spy"]
    assert spy.calls == 2  # one calibration pass per run (PEFT and DEFT), whatever the number of targets
    assert len(spy.rows) == 2 * 40
    assert not any(mark_id in r for r in spy.rows)
    train = {tuple(tok(row.rsplit("\t", 1)[0])["input_ids"]) for row in _sample("train", 48)}
    assert all(tuple(r) in train for r in spy.rows)  # every calibration row is a training row


def test_compare_writes_the_baseline_curves_and_iso_accuracy(compared):
    data = json.loads((compared["out"] / "compare.json").read_text())
    summary, curves, iso = data["summary"], data["threshold_curves"], data["iso_accuracy"]
    assert set(curves) == {"PEFT + thresholds", "DEFT + thresholds"}
    for label in ("PEFT", "DEFT"):
        curve = curves[f"{label} + thresholds"]
        (seed,) = curve["seeds"]
        full, half, fifth = seed["points"]
        # target 1.0 means no threshold: the run's own dev rows and model give back the run's own metric
        assert all(t == 0.0 for t in full["thresholds"].values())
        assert full["metric"] == pytest.approx(summary["rows"][label]["metric_mean"], abs=1e-6)
        assert full["density"] == pytest.approx(full["exact_density"])
        # thresholds calibrated on training rows leave about the target share active on dev rows
        for p in (half, fifth):
            assert p["density"] == pytest.approx(p["target_density"], abs=0.12)
            assert p["density"] < p["exact_density"]
        assert [p["target_density"] for p in curve["points"]] == [1.0, 0.5, 0.2]
        assert curve["points"][1]["metric_mean"] == half["metric"]  # one seed: the mean is that seed
    # iso-accuracy, checked against its definition on the curves compare.json holds
    ref = summary["rows"]["PEFT"]["metric_mean"]
    assert iso["reference"] == ref and iso["max_drop_points"] == 0.5
    pts = {
        "PEFT": [(summary["rows"]["PEFT"]["density_mean"], ref)],
        "DEFT": [(summary["rows"]["DEFT"]["density_mean"], summary["rows"]["DEFT"]["metric_mean"])],
    }
    for kind, c in curves.items():
        pts[kind] = [(p["density_mean"], p["metric_mean"]) for p in c["points"]]
    assert set(iso["kinds"]) == set(pts)
    for kind, points in pts.items():
        ok = [(d, m) for d, m in points if m >= ref - 0.005 - 1e-12]
        got = iso["kinds"][kind]
        if ok:
            best = min(ok, key=lambda p: (p[0], -p[1]))
            assert (got["density"], got["metric"]) == pytest.approx(best)
        else:
            assert got["density"] is None
    assert iso["kinds"]["PEFT"]["density"] == summary["rows"]["PEFT"]["density_mean"]
    assert iso["matched_density"] == iso["kinds"]["PEFT + thresholds"]["density"]
    # the printout: the old table and Density Change line as before, the iso-accuracy table after them
    text = compared["stdout"]
    assert text.index("Density Change:") < text.index("Iso-accuracy") < text.index("table:")
    assert "| DEFT + thresholds |" in text
    md = (compared["out"] / "compare.md").read_text()
    assert md.startswith(data["summary"]["model"]) and "Iso-accuracy" in md
    # the curve figure: every threshold curve and run kind in its legend (svg text is searchable)
    assert (compared["out"] / "tradeoff.png").stat().st_size > 1000
    svg = (compared["out"] / "tradeoff.svg").read_text()
    for label in ("PEFT + thresholds", "DEFT + thresholds", "PEFT (1 seed)", "DEFT (1 seed)", "within 0.5 points"):
        assert label in svg


def test_rerun_reuses_the_curves_unless_asked_otherwise(compared, monkeypatch, capsys):
    from deft import cli

    before = json.loads((compared["out"] / "compare.json").read_text())
    spy = _CalibrationSpy(monkeypatch)
    assert cli.main(compared["flags"]) == 0
    assert capsys.readouterr().out.count("reusing thresholded curve") == 2 and spy.calls == 0
    after = json.loads((compared["out"] / "compare.json").read_text())
    assert after["iso_accuracy"] == before["iso_accuracy"]
    # other targets: computed again
    assert cli.main([*compared["flags"], "--baseline-densities", "0.5"]) == 0
    assert spy.calls == 2
    assert [
        p["target_density"]
        for p in json.loads((compared["out"] / "compare.json").read_text())["threshold_curves"]["PEFT + thresholds"][
            "points"
        ]
    ] == [0.5]


def test_non_glue_tasks_get_no_curve(capsys):
    from deft.recipes.compare import CompareArgs, threshold_curves

    runs = {"PEFT": [{"task": "squad", "task_type": "QUESTION_ANS", "config": {"output": "x", "seed": 0}}]}
    assert threshold_curves(CompareArgs(), runs) == {}
    assert "not GLUE sequence classification" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- measure / energy / skip
@pytest.fixture(scope="module")
def thresholded_run(compared, tmp_path_factory):
    """The compare's PEFT run, copied, with a thresholds.json calibrated on its merged model (as train writes)."""
    import shutil

    from deft.recipes.evaluate import labelled_batches, load_run_model, run_rows
    from deft.tasks import drop_labels

    run = tmp_path_factory.mktemp("thr") / "run"
    shutil.copytree(compared["out"] / "peft-seed0", run)
    res = json.loads((run / "results.json").read_text())
    res["config"]["output"] = str(run)
    (run / "results.json").write_text(json.dumps(res))
    model, tok, _ = load_run_model(run)
    train, dev = run_rows(res["config"])
    merged = model.merge_and_unload()
    th = calibrate_thresholds(merged, [drop_labels(b) for b in labelled_batches(train, tok, res["config"], 16)], 0.3)
    save_thresholds(run / "adapter", th)
    return {
        "run": run,
        "thresholds": th,
        "glue": compared["glue"],
        "results": res,
        "dev": labelled_batches(dev, tok, res["config"], 64),
    }


def test_measure_energy_and_skip_use_the_adapter_thresholds(thresholded_run, tiny_model_dir, tmp_path):
    from deft import cli
    from deft.recipes.evaluate import evaluate_glue, load_run_model

    run, th, glue = thresholded_run["run"], thresholded_run["thresholds"], thresholded_run["glue"]
    common = [
        "--model",
        str(tiny_model_dir),
        "--task",
        "sst2",
        "--data-dir",
        str(glue),
        "--adapter",
        str(run / "adapter"),
    ]

    assert cli.main(["measure", *common, "--output", str(tmp_path / "m")]) == 0
    eff = json.loads((tmp_path / "m" / "density.json").read_text())["density"]
    assert eff["thresholds"] == th
    assert eff["overall"] == pytest.approx(0.3, abs=0.12) and eff["overall"] < eff["exact_overall"]
    assert cli.main(["measure", *common, "--no-use-thresholds", "--output", str(tmp_path / "m0")]) == 0
    plain = json.loads((tmp_path / "m0" / "density.json").read_text())["density"]
    assert plain["thresholds"] is None
    assert plain["overall"] == pytest.approx(thresholded_run["results"]["density"]["overall"])
    # layer 0 sees the same raw input with or without thresholds: its exact density is the plain one
    assert eff["layers"][0]["exact_density"] == pytest.approx(plain["layers"][0]["density"])
    assert cli.main(["measure", *common, "--threshold", "0.1"]) == 2  # two counting thresholds at once

    assert cli.main(["energy", *common, "--output", str(tmp_path / "e")]) == 0
    energy = json.loads((tmp_path / "e" / "energy.json").read_text())["energy"]
    assert energy["thresholds"] == th
    downs = [layer for layer in energy["layers"] if layer["op"] == "mlp_down"]
    assert [layer["threshold"] for layer in downs] == [th[n] for n in sorted(th)]
    # the merged model priced here and the unmerged one measured above count the same active inputs
    assert [layer["act_in_nonzero"] / layer["act_in"] for layer in downs] == pytest.approx(
        [layer["density"] for layer in eff["layers"]], abs=1e-3
    )
    assert cli.main(["energy", *common, "--no-use-thresholds", "--output", str(tmp_path / "e0")]) == 0
    energy0 = json.loads((tmp_path / "e0" / "energy.json").read_text())["energy"]
    assert energy["zero_skip_pj"] < energy0["zero_skip_pj"]

    assert cli.main(["skip", "--run", str(run), "--max-drop", "100", "--output", str(tmp_path / "s")]) == 0
    skip = json.loads((tmp_path / "s" / "skip.json").read_text())
    assert skip["density_before"]["effective"] == pytest.approx(eff["overall"])
    # metric_before is the thresholded model's: served through sparsify's kernel on the merged model
    model = load_run_model(run)[0].merge_and_unload()
    sparsify(model, mode="threshold", threshold=th, max_density=1.0)
    served = evaluate_glue(model, thresholded_run["dev"], "sst2")[0]["accuracy"]
    assert skip["metric_before"] == pytest.approx(served)


def test_bad_thresholds_file_fails_the_command_with_one_line(thresholded_run, tiny_model_dir, tmp_path, capsys):
    import shutil

    from deft import cli

    adapter = tmp_path / "adapter"
    shutil.copytree(thresholded_run["run"] / "adapter", adapter)
    (adapter / "thresholds.json").write_text('{"bert.encoder.layer.0.output.dense": -1}')
    capsys.readouterr()
    assert (
        cli.main(
            [
                "measure",
                "--model",
                str(tiny_model_dir),
                "--task",
                "sst2",
                "--data-dir",
                str(thresholded_run["glue"]),
                "--adapter",
                str(adapter),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    (line,) = [s for s in err.splitlines() if s.startswith("deft measure: error:")]  # (loading bars aside)
    assert "bert.encoder.layer.0.output.dense" in line and "thresholds.json" in line and "Traceback" not in err


def test_calibration_keeps_out_of_the_held_out_part_of_a_dev_only_folder(tiny_model_dir, tmp_path, monkeypatch):
    """With only a dev file, training uses a seeded split of it: calibration must stay in the training part."""
    from transformers import AutoTokenizer

    from deft import cli
    from deft.recipes.compare import threshold_curve
    from deft.tasks import split_dev

    rows = _sample("dev", 60)
    _, held = split_dev(list(range(len(rows))))  # the indices training will hold out for evaluation
    glue = _write_glue(tmp_path / "glue", None, [_mark(r) if i in held else r for i, r in enumerate(rows)])
    assert cli.main(["train", *_flags(tiny_model_dir, glue, tmp_path / "run")]) == 0
    spy = _CalibrationSpy(monkeypatch)
    points = threshold_curve(tmp_path / "run", [0.4], calib_samples=1000)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    (mark_id,) = tok(MARK, add_special_tokens=False)["input_ids"]
    assert len(spy.rows) == len(rows) - len(held)  # every training row, no evaluation row
    assert not any(mark_id in r for r in spy.rows)
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["eval_examples"] == len(held) and 0 < points[0]["density"] < points[0]["exact_density"]


def test_measure_of_a_target_density_run_gives_back_its_effective_density(compared, tiny_model_dir, tmp_path):
    """deft train --target-density writes adapter/thresholds.json; measure and energy pick it up unasked."""
    from deft import cli

    run = tmp_path / "run"
    assert (
        cli.main(["train", *_flags(tiny_model_dir, compared["glue"], run), "--alpha", "0", "--target-density", "0.3"])
        == 0
    )
    res = json.loads((run / "results.json").read_text())
    common = [
        "--model",
        str(tiny_model_dir),
        "--task",
        "sst2",
        "--data-dir",
        str(compared["glue"]),
        "--adapter",
        str(run / "adapter"),
    ]
    assert cli.main(["measure", *common, "--output", str(tmp_path / "m")]) == 0
    measured = json.loads((tmp_path / "m" / "density.json").read_text())["density"]
    assert measured["thresholds"] == load_thresholds(run)
    assert measured["overall"] == pytest.approx(res["density"]["overall"], abs=1e-9)
    assert cli.main(["energy", *common, "--output", str(tmp_path / "e")]) == 0
    by_op = json.loads((tmp_path / "e" / "energy.json").read_text())["energy"]["by_op"]
    assert by_op["mlp_down"]["input_nonzero_fraction"] == pytest.approx(res["density"]["overall"], abs=1e-3)
