"""DeftTrainer: a drop-in ``transformers.Trainer`` that adds the density loss; DensityMixin: the same for its
subclasses.

``total = task_loss + alpha * density_loss``. Both terms are normalised over the *whole optimizer step*
(all gradient-accumulation micro-batches, all DDP processes), so one step is the same for GA=1 and
GA=2 and for 1 or N processes at the same global batch. transformers 5's own Trainer does not give
that for every model: a model whose forward accepts ``**kwargs`` is assumed to scale its loss by
``num_items_in_batch`` itself, which e.g. sequence classification heads do not, so GA=2 doubles the
update. DeftTrainer computes its own normalisation and sets ``loss_is_scaled_for_ga = True``.
"""

from __future__ import annotations

import functools
import math
import operator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import Trainer, TrainerCallback

from ..core.probe import ActivationProbe
from ..core.report import DensityReport
from ..core.threshold import THRESHOLDS_FILE, ThresholdTracker, read_thresholds, save_thresholds
from ..errors import ConfigError
from .config import DensityConfig


def _batch_size(batch: dict[str, Any]) -> int:
    for v in batch.values():
        if torch.is_tensor(v) and v.dim() > 0:
            return int(v.shape[0])
    return 1


if TYPE_CHECKING:
    # to the type checker the mixin is the Trainer it is mixed into (its attributes, super() methods)
    _TrainerBase = Trainer
else:
    _TrainerBase = object


class DensityMixin(_TrainerBase):
    """Density loss + density metrics for any ``transformers.Trainer`` subclass.

    Put it first among the bases: ``class MySFT(deft.DensityMixin, trl.SFTTrainer)``, then pass the
    extra keyword ``density`` (:class:`DensityConfig`). Logs ``task_loss``, ``density_loss`` and the
    running ``train_density`` every logging step; evaluation adds ``eval_density`` (overall),
    ``eval_density_<group>`` and ``eval_density_layer_<i>``. The last eval report is kept in
    ``trainer.last_density_report``.

    The task loss is the parent trainer's own (``uses_parent_loss = True``): the mixin calls
    ``super().compute_loss`` with the ``num_items_in_batch`` the Trainer passes, so e.g. TRL's
    completion-only, packed or DFT loss and its entropy / token-accuracy metrics are kept as they are, and
    adds ``alpha * density`` on top. The density term is normalised over the whole optimizer step (all
    gradient-accumulation micro-batches, all DDP processes) whatever the parent does: when the Trainer
    will divide the returned loss by the accumulation steps (a parent loss that is a micro-batch mean),
    the density term is multiplied by them first. The density counts every real token the MLPs run
    (prompt tokens too, which a completion-only loss ignores: serving runs them through the MLPs all the
    same). Batches without an ``attention_mask`` (TRL's ``padding_free`` / packing) count every position,
    which in those batches are all real tokens. ``distill`` needs the logits of the task forward and
    works with :class:`DeftTrainer` only.
    """

    #: True: the task loss is the parent class's ``compute_loss``; False: the mixin runs the model itself
    uses_parent_loss = True

    def __init__(
        self,
        *args: Any,
        density: DensityConfig | None = None,
        teacher: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.density = density or DensityConfig()
        if self.uses_parent_loss and self.density.distill > 0:
            raise ConfigError(
                f"DensityConfig.distill needs DeftTrainer's own task loss; "
                f"{type(self).__name__} uses its parent's compute_loss: set distill=0"
            )
        if teacher is not None and not self.density.distill > 0:
            raise ConfigError("a teacher model is only used by distillation: set DensityConfig.distill > 0")
        # the model distillation holds the student to: a separate, frozen (typically dense PEFT) model, or
        # None for the student's own unmasked outputs
        self.teacher = teacher
        if teacher is not None:
            teacher.requires_grad_(False).eval().to(self.args.device)
        self.density_loss = self.density.make_loss()
        target = self.density.target_density
        targeted = target is not None
        if self.model is None:  # Trainer sets it from model= or model_init()
            raise ConfigError(f"{type(self).__name__} needs a model")
        self.probe = ActivationProbe(
            self.model,
            sites=self.density.sites,
            # a served model skips W2 input units: that is where the target-density mode masks and counts
            point="down_input" if targeted else self.density.point,
            threshold=self.density.threshold,
            include_padding=self.density.include_padding,
        )
        # with alpha = 0 nothing needs the loss partials: skip their cost, keep the counting
        self.probe.track(self.density_loss if self.density.alpha > 0 else None)
        self.probe.attach()
        self.thresholds: ThresholdTracker | None = None
        if target is not None:
            self.thresholds = ThresholdTracker(
                self.probe,
                target=float(target),
                ramp=self.density.density_ramp,
                schedule=self.density.density_schedule,
                momentum=self.density.threshold_momentum,
                straight_through=self.density.straight_through,
            )
            self.add_callback(_SaveThresholds(self))
        self.last_density_report: DensityReport | None = None
        self._step_totals: dict[str, Any] = {}
        self._log_sums = {"task_loss": 0.0, "density_loss": 0.0, "n": 0}
        self._warned_fallback = False
        self._ada_prev: list[tuple[int, int]] = [(0, 0)] * len(self.probe.sites)
        self._ada_density: list[float] | None = None
        self._ada_step = -1

    # ------------------------------------------------------------------ normalisers
    def _is_causal(self) -> bool:
        cfg = getattr(self.probe.top, "config", None)
        return not getattr(cfg, "is_encoder_decoder", False) and getattr(self, "_loss_shifts_labels", False)

    def _task_items(self, batch: dict[str, Any]) -> int:
        labels = batch.get("labels")
        if torch.is_tensor(labels) and labels.dim() >= 2 and not labels.is_floating_point():
            # token-level targets: the model's loss is a mean over the non-ignored (shifted) tokens
            lab = labels[..., 1:] if self._is_causal() else labels
            return int(lab.ne(-100).sum())
        return _batch_size(batch)

    def _density_tokens(self, batch: dict[str, Any]) -> dict[str, int] | None:
        """Tokens each site group will see in this micro-batch, predicted from the inputs (None = unknown)."""
        cfg = getattr(self.probe.top, "config", None)
        groups = set(self.probe.groups)

        def count(mask_key: str, ids_keys: tuple[str, ...]) -> int | None:
            mask = batch.get(mask_key)
            if torch.is_tensor(mask) and not self.density.include_padding:
                return int(mask.sum())
            for k in ids_keys:
                v = batch.get(k)
                if torch.is_tensor(v) and v.dim() >= 2:
                    return int(v.shape[0] * v.shape[1])
            return None

        out: dict[str, int | None] = {}
        if getattr(cfg, "is_encoder_decoder", False):
            out["encoder"] = count("attention_mask", ("input_ids",))
            out["decoder"] = count("decoder_attention_mask", ("decoder_input_ids", "labels"))
        else:
            out["all"] = count("attention_mask", ("input_ids",))
        known = {g: n for g in groups if (n := out.get(g)) is not None}
        return known if len(known) == len(groups) else None

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        totals: dict[str, Any] = {"task": sum(self._task_items(b) for b in batch_samples), "density": None}
        per_batch = [self._density_tokens(b) for b in batch_samples]
        counted = [p for p in per_batch if p is not None]
        if counted and len(counted) == len(per_batch):
            groups = sorted(counted[0])
            totals["density"] = {g: sum(p[g] for p in counted) for g in groups}
        if self.args.world_size > 1:
            # every process needs the global counts: gather and sum them
            keys = ["task"] + ([f"d:{g}" for g in sorted(totals["density"])] if totals["density"] else [])
            vals = [totals["task"]] + (
                [totals["density"][g] for g in sorted(totals["density"])] if totals["density"] else []
            )
            t = torch.tensor(vals, dtype=torch.float64, device=device)
            g = self.accelerator.gather(t.unsqueeze(0)).sum(dim=0).tolist()
            totals = {"task": g[0], "density": {k[2:]: v for k, v in zip(keys[1:], g[1:], strict=True)} or None}
        self._step_totals = totals
        return batch_samples, num_items

    # ------------------------------------------------------------------ loss
    def current_alpha(self) -> float:
        a = self.density.alpha
        if self.density.alpha_warmup > 0 and self.state.max_steps > 0:
            ramp = self.density.alpha_warmup * self.state.max_steps
            a *= min(1.0, (self.state.global_step + 1) / max(ramp, 1.0))
        return a

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.uses_parent_loss:
            return self._parent_loss_plus_density(model, inputs, return_outputs, num_items_in_batch)
        if not model.training or not torch.is_grad_enabled():
            outputs = model(**inputs)
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
            return (loss, outputs) if return_outputs else loss

        teacher = self._teacher_outputs(model, inputs) if self.density.distill > 0 else None
        if self.thresholds is not None:
            self._threshold_step()
        outputs = model(**inputs)  # no num_items_in_batch: we want the micro-batch mean and rescale below
        task = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
        ws = max(1, self.args.world_size)
        ga = max(1, self.current_gradient_accumulation_steps)
        totals = self._step_totals
        # DDP averages gradients over processes: the factor ws turns that average back into a sum
        share = self._task_items(inputs) * ws / totals["task"] if totals.get("task") else 1.0 / ga
        task_scaled = task * share
        loss = task_scaled
        if teacher is not None:
            kd = distill_loss(outputs["logits"], teacher, inputs, self.density.distill_temperature)
            self._log_sums["distill_loss"] = self._log_sums.get("distill_loss", 0.0) + float(kd.detach())
            loss = loss + self.density.distill * kd * share
        self._log_sums["task_loss"] += float(task.detach())
        self._log_sums["n"] += 1

        if self.density.alpha > 0:
            if self.density.adaptive:
                self._update_adaptive_weights()
            dens_mean = self.density_loss(self.probe)  # this micro-batch's own mean, for logging
            self._log_sums["density_loss"] += float(dens_mean.detach())
            dens_scaled = self._scaled_density(inputs, dens_mean, ws, ga)
            loss = loss + self.current_alpha() * dens_scaled
        return (loss, outputs) if return_outputs else loss

    def _parent_loss_plus_density(self, model, inputs, return_outputs, num_items_in_batch):
        training = model.training and torch.is_grad_enabled()
        if training and self.thresholds is not None:
            self._threshold_step()
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if not training:
            return result
        if return_outputs:
            loss, outputs = result
        else:
            loss, outputs = result, None
        ga = max(1, self.current_gradient_accumulation_steps)
        # Trainer.training_step divides the returned loss by the accumulation steps unless the loss is
        # already normalised over the whole step: the same test it makes, so the density term can be
        # pre-multiplied to come out of that division normalised over the step too
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (
                bool(getattr(self, "model_accepts_loss_kwargs", False)) and num_items_in_batch is not None
            ) or getattr(self, "compute_loss_func", None) is not None
        # logged on the scale of Trainer's own "loss": averaging (ga x a step-normalised share) over the
        # micro-batches gives the step's mean
        self._log_sums["task_loss"] += float(loss.detach()) * (ga if scaled else 1)
        self._log_sums["n"] += 1
        if self.density.alpha > 0:
            if self.density.adaptive:
                self._update_adaptive_weights()
            dens_mean = self.density_loss(self.probe)
            self._log_sums["density_loss"] += float(dens_mean.detach())
            dens_step = self._scaled_density(inputs, dens_mean, max(1, self.args.world_size), ga)
            loss = loss + self.current_alpha() * dens_step * (1 if scaled else ga)
        return (loss, outputs) if return_outputs else loss

    # ------------------------------------------------------------------ target density / distillation
    def _threshold_step(self) -> None:
        assert self.thresholds is not None
        pending = self.thresholds.pending()
        if self.args.world_size > 1 and pending and torch.distributed.is_initialized():
            # every process masks with the same thresholds: average the quantiles their batches measured
            names = sorted(pending)
            v = torch.tensor([pending[n] for n in names], dtype=torch.float64, device=self.args.device)
            torch.distributed.all_reduce(v)
            pending = {n: float(x) / self.args.world_size for n, x in zip(names, v.tolist(), strict=True)}
        progress = self.state.global_step / self.state.max_steps if self.state.max_steps else 1.0
        self.thresholds.step(progress, pending)

    def _teacher_outputs(self, model, inputs) -> torch.Tensor:
        """The logits distillation holds on to: the teacher model's, or else the same model's run dense (no
        masking) and without dropout."""
        if self.teacher is not None:
            with torch.no_grad():
                return self.teacher(**inputs)["logits"].detach()
        snap = self._density_snapshot()
        masks = self.probe.thresholds_in_use()
        target, self.probe.target = self.probe.target, None
        self.probe.mask_below(None)
        model.eval()
        try:
            with torch.no_grad():
                out = model(**inputs)
        finally:
            model.train()
            self.probe.mask_below(masks or None, straight_through=self.density.straight_through)
            self.probe.target = target
            self._restore_snapshot(snap)
        return out["logits"].detach()

    def final_thresholds(self) -> dict[str, float] | None:
        """The per-layer thresholds the model was last evaluated with (None unless target_density is set)."""
        return dict(self.thresholds.thresholds) if self.thresholds is not None else None

    def train(self, resume_from_checkpoint=None, *args: Any, **kwargs: Any):
        if self.thresholds is not None and resume_from_checkpoint:
            ckpt = resume_from_checkpoint
            if ckpt is True:
                from transformers.trainer_utils import get_last_checkpoint

                ckpt = get_last_checkpoint(self.args.output_dir)
            if ckpt and (Path(ckpt) / THRESHOLDS_FILE).exists():
                self.thresholds.load_state_dict({"thresholds": read_thresholds(Path(ckpt) / THRESHOLDS_FILE)})
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _update_adaptive_weights(self) -> None:
        """ADA-DEFT layer weights from each layer's recent train density (see docs/ada-deft.md).

        Only a layer that goes fully silent can be skipped, so the pay-off of sparsity is convex in a
        layer's density: weight ~ (1 - density)^gamma moves the density budget to the layers already
        closest to silence. Weights are mixed with the uniform ones and keep mean 1, so alpha keeps its
        meaning.
        """
        step = self.state.global_step
        if step == self._ada_step or step % self.density.adaptive_every:
            return
        self._ada_step = step
        dens = []
        for i, s in enumerate(self.probe.sites):
            pnz, pen = self._ada_prev[i]
            if s.entries < pen:  # counts were reset by a log step since the last update
                pnz = pen = 0
            dn, de = s.nonzero - pnz, s.entries - pen
            self._ada_prev[i] = (s.nonzero, s.entries)
            dens.append(dn / de if de else float("nan"))
        if self._ada_density is None:
            self._ada_density = [1.0 if math.isnan(d) else d for d in dens]
        else:  # smooth over updates: a single micro-batch is a noisy estimate
            self._ada_density = [
                p if math.isnan(d) else 0.7 * p + 0.3 * d for p, d in zip(self._ada_density, dens, strict=True)
            ]
        v = [(1.0 - d + 1e-3) ** self.density.adaptive_gamma for d in self._ada_density]
        n, total = len(v), sum(v)
        mix = self.density.adaptive_mix
        self.density_loss.layer_weights = [(1 - mix) + mix * n * x / total for x in v]

    def _scaled_density(self, inputs, dens_mean: torch.Tensor, ws: int, ga: int) -> torch.Tensor:
        if self.density.granularity != "token" or not self._step_totals.get("density"):
            return dens_mean / ga
        predicted = self._density_tokens(inputs)
        seen = {}
        for s in self.probe.sites:
            if s.partials:
                seen[s.group] = sum(p[1] for p in s.partials) // max(s.units, 1)
        if predicted is None or any(seen.get(g) != n for g, n in predicted.items() if g in seen):
            # e.g. prompt tuning adds virtual tokens the inputs don't show: fall back to the per-micro-batch mean
            if not self._warned_fallback:
                self._warned_fallback = True
                import warnings

                warnings.warn(
                    "deft: the token count seen by the MLPs differs from the inputs' attention mask "
                    f"(seen {seen}, predicted {predicted}); the density term is averaged per micro-batch instead "
                    "of over the whole accumulated batch",
                    stacklevel=2,
                )
            return dens_mean / ga
        totals = self._step_totals["density"]
        # per-layer sums divided by the step's token count: summing micro-batches gives the step mean
        per = self.density_loss.per_layer(self.probe, num_tokens=1.0)
        vals = [v / float(totals[s.group]) for v, s in zip(per, self.probe.sites, strict=True) if v is not None]
        weights = self.density_loss.weight_vector(len(per), dens_mean.device)
        used = [i for i, v in enumerate(per) if v is not None]
        total = functools.reduce(operator.add, [w * v for w, v in zip([weights[i] for i in used], vals, strict=True)])
        return total / len(used) * ws

    # ------------------------------------------------------------------ logging & evaluation
    def _density_snapshot(self) -> list[tuple[int, int, int, int, float, int]]:
        return [(s.nonzero, s.entries, s.tokens, s.units, s.union_sum, s.union_batches) for s in self.probe.sites]

    def _restore_snapshot(self, snap) -> None:
        for s, (nz, en, tok, un, us, ub) in zip(self.probe.sites, snap, strict=True):
            s.nonzero, s.entries, s.tokens, s.units, s.union_sum, s.union_batches = nz, en, tok, un, us, ub

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._log_sums["n"]:
            n = self._log_sums["n"]
            logs["task_loss"] = round(self._log_sums["task_loss"] / n, 6)
            if self.density.alpha > 0:
                logs["density_loss"] = round(self._log_sums["density_loss"] / n, 6)
                logs["alpha"] = self.current_alpha()
            if "distill_loss" in self._log_sums:
                logs["distill_loss"] = round(self._log_sums["distill_loss"] / n, 6)
            if self.thresholds is not None:
                logs["target_density_now"] = round(self.thresholds.density, 6)
            if self.density.adaptive and self.density_loss.layer_weights is not None:
                w = list(self.density_loss.layer_weights)
                logs["ada_weight_min"], logs["ada_weight_max"] = round(min(w), 4), round(max(w), 4)
            report = DensityReport.from_probe(self.probe)
            if not math.isnan(report.overall):
                logs["train_density"] = round(report.overall, 6)
                for i, layer in enumerate(report.layers):
                    logs[f"train_density_layer_{i}"] = round(layer.density, 6)
            self._log_sums = {"task_loss": 0.0, "density_loss": 0.0, "n": 0}
            self.probe.reset()
        super().log(logs, *args, **kwargs)

    def evaluation_loop(self, *args: Any, **kwargs: Any):
        train_counts = self._density_snapshot()
        self.probe.reset()
        try:
            output = super().evaluation_loop(*args, **kwargs)
            report = DensityReport.from_probe(self.probe)
        finally:
            self.probe.reset()
            self._restore_snapshot(train_counts)
        prefix = kwargs.get("metric_key_prefix", args[3] if len(args) > 3 else "eval")
        self.last_density_report = report
        metrics = output.metrics
        assert metrics is not None  # Trainer.evaluation_loop always returns a dict of metrics
        metrics[f"{prefix}_density"] = report.overall
        metrics[f"{prefix}_union_density"] = report.union_overall
        for g, v in report.groups.items():
            if g != "all":
                metrics[f"{prefix}_density_{g}"] = v
        for i, layer in enumerate(report.layers):
            metrics[f"{prefix}_density_layer_{i}"] = layer.density
        return output


class DeftTrainer(DensityMixin, Trainer):
    """``transformers.Trainer`` + density loss + density metrics (:class:`DensityMixin`).

    Extra argument ``density`` (:class:`DensityConfig`). Unlike the mixin on another trainer, it runs the
    model itself and normalises the task loss over the whole optimizer step too (the module docstring
    says why), so one step is the same for any accumulation / process count; it also supports
    ``distill``.
    """

    uses_parent_loss = False
    loss_is_scaled_for_ga = True

    def __init__(self, model=None, args=None, *, density: DensityConfig | None = None, **kwargs: Any) -> None:
        super().__init__(model=model, args=args, density=density, **kwargs)


class _SaveThresholds(TrainerCallback):
    """Writes the current thresholds into each checkpoint, so ``--resume`` masks as the run did."""

    def __init__(self, trainer: DensityMixin) -> None:
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.trainer.thresholds is not None:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                save_thresholds(ckpt, self.trainer.thresholds.thresholds)
        return control


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, inputs: dict[str, Any], temperature: float = 1.0):
    """KL(teacher || student) of the softmax outputs, mean over examples (or valid tokens); MSE for one output.

    2-D logits (classification) average over the batch; 3-D logits (token-level) over the positions the
    attention mask marks real. A single output (regression) uses the squared error instead.
    """
    s, t = student.float(), teacher.float()
    if s.shape[-1] == 1:
        return torch.nn.functional.mse_loss(s, t)
    T = temperature
    kl = torch.nn.functional.kl_div(
        torch.log_softmax(s / T, dim=-1), torch.log_softmax(t / T, dim=-1), log_target=True, reduction="none"
    ).sum(-1) * (T * T)
    if kl.dim() == 2:
        mask = inputs.get("attention_mask")
        if torch.is_tensor(mask) and mask.shape == kl.shape:
            m = mask.to(kl.dtype)
            return (kl * m).sum() / m.sum().clamp_min(1.0)
    return kl.mean()
