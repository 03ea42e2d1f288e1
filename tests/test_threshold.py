"""Training under thresholds (DensityConfig.target_density): masking, its gradient, schedule, artifact."""

from __future__ import annotations

import json
import math

import pytest
import torch

from deft import ActivationProbe, ConfigError
from deft.core.threshold import ThresholdTracker, read_thresholds, save_thresholds, scheduled_density


def _tiny(model_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2).eval()
    batch = tok(
        ["a gripping, funny film", "dull and far too long, a film to forget"], padding=True, return_tensors="pt"
    )
    return model, batch


def _down_inputs(model, batch) -> dict[str, torch.Tensor]:
    """The dense model's W2 inputs, by down-projection name (an independent hook, not the probe's)."""
    seen: dict[str, torch.Tensor] = {}
    handles = [
        m.register_forward_pre_hook(lambda mod, a, n=n: seen.__setitem__(n, a[0].detach()))
        for n, m in model.named_modules()
        if n.endswith("output.dense") and ".attention." not in n
    ]
    with torch.no_grad():
        model(**batch)
    for h in handles:
        h.remove()
    return seen


def test_masked_forward_equals_zeroing_by_hand(tiny_model_dir):
    model, batch = _tiny(tiny_model_dir)
    dense = _down_inputs(model, batch)
    names = sorted(dense)
    th = {n: float(dense[n].abs().median()) for n in names}  # about half the units of each layer go

    # by hand: zero |h| <= t at the input of every W2 (and keep what each W2 was offered)
    offered: dict[str, torch.Tensor] = {}

    def zero(mod, args, t):
        offered[[n for n in names if model.get_submodule(n) is mod][0]] = args[0].detach()
        return (args[0] * (args[0].abs() > t),)

    handles = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, t=th[n]: zero(m, a, t)) for n in names]
    with torch.no_grad():
        want = model(**batch).logits
    for h in handles:
        h.remove()

    probe = ActivationProbe(model, point="down_input")
    assert [s.name for s in probe.sites] == [f"bert.{n}" if not n.startswith("bert.") else n for n in names]
    probe.mask_below({s.name: th[n] for s, n in zip(probe.sites, names, strict=True)})
    with probe, torch.no_grad():
        got = model(**batch).logits
    torch.testing.assert_close(got, want)
    # what the probe counted is the effective density: the share of real-token entries above t
    mask = batch["attention_mask"].bool()
    for s, n in zip(probe.sites, names, strict=True):
        expect = float((offered[n].abs() > th[n])[mask].float().mean())
        assert s.density() == pytest.approx(expect)


@pytest.mark.parametrize("straight_through", [False, True])
def test_gradient_of_masked_units(tiny_model_dir, straight_through):
    model, batch = _tiny(tiny_model_dir)
    model.train()
    for mod in model.modules():  # no dropout: the two passes must see the same function
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    act_name = "bert.encoder.layer.0.intermediate.intermediate_act_fn"
    grads: dict[str, torch.Tensor] = {}
    keep_holder: dict[str, torch.Tensor] = {}

    def keep_grad(mod, args, out):
        keep_holder["h"] = out
        out.register_hook(lambda g: grads.__setitem__("h", g))

    probe = ActivationProbe(model, point="down_input")
    site = probe.sites[0].name
    with torch.no_grad():
        t = float(_down_inputs(model, batch)["bert.encoder.layer.0.output.dense"].abs().quantile(0.7))
    h = model.get_submodule(act_name).register_forward_hook(keep_grad)
    probe.mask_below({site: t}, straight_through=straight_through)

    # what the masked input of W2 receives as gradient, taken from a hook placed after the probe's
    post: dict[str, torch.Tensor] = {}
    with probe:
        h2 = model.get_submodule(site).register_forward_pre_hook(
            lambda m, a: a[0].register_hook(lambda g: post.__setitem__("g", g)) and None
        )
        model(**batch).logits.sum().backward()
        h2.remove()
    h.remove()
    keep = keep_holder["h"].detach().abs() > t
    assert 0 < keep.float().mean() < 1
    if straight_through:
        torch.testing.assert_close(grads["h"], post["g"])  # identity through the mask
        assert grads["h"][~keep].abs().sum() > 0
    else:
        torch.testing.assert_close(grads["h"], post["g"] * keep)  # d(x * [|x| > t]) / dx = [|x| > t]
        assert grads["h"][~keep].abs().sum() == 0


def test_schedule_by_hand():
    assert scheduled_density(0.0, 0.1, 0.6) == pytest.approx(1.0)
    assert scheduled_density(0.3, 0.1, 0.6) == pytest.approx(0.1 + 0.9 * 0.5)  # cosine midpoint
    assert scheduled_density(0.15, 0.1, 0.6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert scheduled_density(0.6, 0.1, 0.6) == pytest.approx(0.1)
    assert scheduled_density(0.9, 0.1, 0.6) == pytest.approx(0.1)
    assert scheduled_density(0.3, 0.2, 0.6, "linear") == pytest.approx(0.2 + 0.8 * 0.5)
    assert scheduled_density(0.0, 0.2, 0.0) == pytest.approx(0.2)  # no ramp: the target from the start
    with pytest.raises(ConfigError, match="schedule"):
        scheduled_density(0.1, 0.2, 0.5, "step")  # type: ignore[arg-type]


def test_tracker_moving_average(tiny_model_dir):
    model, _ = _tiny(tiny_model_dir)
    probe = ActivationProbe(model, point="down_input")
    a, b = (s.name for s in probe.sites)
    tr = ThresholdTracker(probe, target=0.1, ramp=0.5, momentum=0.75)
    tr.step(0.0, {a: 0.4, b: 0.8})  # the first quantile replaces the initial 0
    assert tr.thresholds == {a: 0.4, b: 0.8}
    tr.step(0.25, {a: 0.8})  # 0.75 * 0.4 + 0.25 * 0.8; b measured nothing and stays
    assert tr.thresholds[a] == pytest.approx(0.5) and tr.thresholds[b] == 0.8
    assert probe.thresholds_in_use() == tr.thresholds
    assert tr.density == pytest.approx(scheduled_density(0.25, 0.1, 0.5))


@pytest.mark.parametrize("value", [1.5, -0.1, float("nan")])
def test_target_density_out_of_range(value):
    from deft import DensityConfig

    with pytest.raises(ConfigError, match="target_density"):
        DensityConfig(target_density=value)
    assert DensityConfig(target_density=0.0).target_density is None  # 0 is "no thresholds", not out of range


def test_thresholds_file_checks(tmp_path, tiny_model_dir):
    save_thresholds(tmp_path, {"a": 0.5})
    assert read_thresholds(tmp_path) == {"a": 0.5}
    for bad, what in (({"a": float("nan")}, "finite"), ({"a": -1.0}, ">= 0"), ({}, "non-empty")):
        (tmp_path / "thresholds.json").write_text(json.dumps(bad))
        with pytest.raises(ConfigError, match=what):
            read_thresholds(tmp_path)
    model, _ = _tiny(tiny_model_dir)
    probe = ActivationProbe(model, point="down_input")
    with pytest.raises(ConfigError, match="bert.encoder.layer.9.output.dense"):
        probe.mask_below({"bert.encoder.layer.9.output.dense": 0.1})


def test_train_writes_thresholds_that_sparsify_serves_unchanged(tiny_model_dir, glue_dir, tmp_path):
    """The thresholds a run ends with reproduce its evaluation when a sparse kernel applies them."""
    from deft.core.report import measure_density
    from deft.fields import build
    from deft.methods import load_trainable
    from deft.recipes.train import TrainArgs, train
    from deft.sparse import sparsify

    out = tmp_path / "run"
    res = train(
        build(
            TrainArgs,
            dict(
                model=str(tiny_model_dir),
                data_dir=str(glue_dir),
                data_source="local",
                target_density=0.3,
                alpha=0.0,
                epochs=2,
                batch_size=8,
                output=str(out),
                quiet=True,
                logging_steps=2,
            ),
        )
    )
    th = read_thresholds(out / "adapter")
    assert res["thresholds"] == th and all(v > 0 for v in th.values())
    assert {h.get("target_density_now") for h in res["log_history"] if "target_density_now" in h} >= {0.3}

    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    model = load_trainable(base, out / "adapter", task_type="SEQ_CLS").merge_and_unload().eval()
    from deft.recipes.evaluate import eval_loader

    cfg = dict(res["config"])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    batches = eval_loader(cfg, tok, None, 8)
    # effective density at the saved thresholds == the density the run reported for its masked eval
    inputs = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    report = measure_density(model, inputs, threshold=th, point="down_input")
    assert report.overall == pytest.approx(res["density"]["overall"], abs=1e-9)
    sparsify(model, mode="threshold", threshold=th)
    correct = total = 0
    with torch.no_grad():
        for b in batches:
            pred = model(**{k: v for k, v in b.items() if k != "labels"}).logits.argmax(-1)
            correct += int((pred == b["labels"]).sum())
            total += len(pred)
    assert correct / total == pytest.approx(res["metric"])


def test_resume_keeps_thresholds(tiny_model_dir, glue_dir, tmp_path):
    from deft.fields import build
    from deft.recipes.train import TrainArgs, train

    out = tmp_path / "run"
    kw = dict(
        model=str(tiny_model_dir),
        data_dir=str(glue_dir),
        data_source="local",
        target_density=0.3,
        alpha=0.0,
        epochs=1,
        batch_size=8,
        output=str(out),
        quiet=True,
    )
    train(build(TrainArgs, kw))
    ckpts = sorted((out / "checkpoints").glob("checkpoint-*"))
    assert ckpts and (ckpts[-1] / "thresholds.json").exists()
    assert read_thresholds(ckpts[-1]) == read_thresholds(out / "adapter")


def test_distillation_from_a_teacher_model(tiny_model_dir, tmp_path):
    """A teacher model replaces the student's own dense outputs as the KL target; it stays frozen and dense."""
    from transformers import TrainingArguments

    from deft import DeftTrainer, DensityConfig
    from deft.train.trainer import distill_loss

    student, batch = _tiny(tiny_model_dir)
    torch.manual_seed(1)
    teacher, _ = _tiny(tiny_model_dir)
    with torch.no_grad():  # a teacher that differs from the student's own dense forward
        teacher.classifier.weight.mul_(-3.0)
    targs = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    batch = {**batch, "labels": torch.tensor([1, 0])}
    with pytest.raises(ConfigError, match="distill"):
        DeftTrainer(student, targs, density=DensityConfig(alpha=0.0, target_density=0.5), teacher=teacher)
    cfg = DensityConfig(alpha=0.0, target_density=0.5, distill=1.0)
    trainer = DeftTrainer(student, targs, density=cfg, teacher=teacher)
    with torch.no_grad():
        expected = teacher(**batch).logits
        own = trainer._teacher_outputs(student, batch)
    torch.testing.assert_close(own, expected)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    # without a teacher the target is the student's own unmasked output, which differs from the teacher's
    self_trainer = DeftTrainer(student, targs, density=cfg)
    with torch.no_grad():
        mine = self_trainer._teacher_outputs(student, batch)
    assert (mine - expected).abs().max() > 1e-2
    assert float(distill_loss(own, expected, batch)) == pytest.approx(0.0, abs=1e-7)


def test_train_distills_from_a_teacher_run(tiny_model_dir, glue_dir, tmp_path, capsys):
    """--teacher RUN: the KL term's target is that finished run's model; a teacher without --distill, or one
    trained on another task, is one line naming --teacher."""
    from deft import cli

    from conftest import one_error_line, tiny_run_flags

    flags = tiny_run_flags(tiny_model_dir, glue_dir, tmp_path / "peft", "--alpha", "0", "--target-density", "0")
    assert cli.main(["train", *flags, "--quiet"]) == 0
    student = tiny_run_flags(tiny_model_dir, glue_dir, tmp_path / "kd", "--alpha", "0", "--logging-steps", "1")
    assert cli.main(["train", *student, "--distill", "1", "--teacher", str(tmp_path / "peft"), "--quiet"]) == 0
    res = json.loads((tmp_path / "kd" / "results.json").read_text())
    assert res["config"]["teacher"] == str(tmp_path / "peft")
    kd = [h["distill_loss"] for h in res["log_history"] if "distill_loss" in h]
    assert kd and all(math.isfinite(v) and v > 0 for v in kd)
    capsys.readouterr()

    no_kd = tiny_run_flags(tiny_model_dir, glue_dir, tmp_path / "x", "--teacher", str(tmp_path / "peft"))
    assert cli.main(["train", *no_kd]) == 2
    line = one_error_line(capsys, "train")
    assert "--teacher" in line and "--distill" in line
    other = json.loads((tmp_path / "peft" / "results.json").read_text())
    other["config"]["task"] = "mrpc"
    (tmp_path / "peft" / "results.json").write_text(json.dumps(other))
    wrong = tiny_run_flags(
        tiny_model_dir, glue_dir, tmp_path / "y", "--distill", "1", "--teacher", str(tmp_path / "peft")
    )
    assert cli.main(["train", *wrong]) == 2
    assert "'mrpc' run" in one_error_line(capsys, "train")


def test_compare_distills_each_seed_from_its_own_peft_run(tiny_model_dir, glue_dir, tmp_path):
    """deft compare --distill W without --teacher: the dense teacher of DEFT seed S is PEFT seed S (never the
    student's own outputs); the PEFT runs themselves distill from nothing."""
    from deft import cli

    from conftest import tiny_run_flags

    out = tmp_path / "cmp"
    flags = tiny_run_flags(tiny_model_dir, glue_dir, out, "--alpha", "0", "--distill", "1", "--quiet")
    assert cli.main(["compare", *flags, "--seeds", "0", "1", "--baseline-densities", "0.5"]) == 0
    for seed in (0, 1):
        peft = json.loads((out / f"peft-seed{seed}" / "results.json").read_text())["config"]
        deft_ = json.loads((out / f"deft-seed{seed}" / "results.json").read_text())["config"]
        assert peft["distill"] == 0 and peft["teacher"] is None
        assert deft_["distill"] == 1 and deft_["teacher"] == str(out / f"peft-seed{seed}")
