"""``deft prune`` and the compression step of ``deft train`` (``--prune-dir``, ``--quantize``).

:func:`prepare_compressed_model` is what :func:`deft.recipes.train.train_with_setup` calls right after
loading the model, before ``apply_method``.

A prune folder holds ``prune_masks.safetensors`` (the WANDA keep-masks), ``prune_report.json`` and, unless
``--no-save-model``, the pruned backbone + tokenizer (``save_pretrained``, safetensors). The backbone is
saved without the task head, like the original checkpoint, so the folder works as ``--model`` for any task.
Because WANDA never changes the kept weights, ``--prune-dir`` on the *original* model gives the same
pruned model as ``--model`` on the prune folder.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ..fields import help_field as _h
from ..io import write_json
from .common import RunError, versions
from .evaluate import DATA_DIR_HELP, TASK_NAMES, input_batches, task_setup

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from ..compress.prune import PruneConfig

# torch / transformers are imported inside the functions: `deft --help` should not pay for them
REPORT_NAME = "prune_report.json"


@dataclass
class PruneArgs:
    """Arguments of ``deft prune``: WANDA-prune a model on calibration batches of a task's training set."""

    model: str = _h("model alias (minilm, smollm2), local path or hub id", default="minilm")
    task: str = _h(f"task whose training examples calibrate the pruning: {TASK_NAMES}", default="sst2")
    data_dir: str | None = _h(DATA_DIR_HELP, default=None)
    data_source: str = _h("auto, local, hub or builtin (the shipped SST-2 sample)", default="auto")
    sparsity: float = _h("fraction of each output row's weights to zero (unstructured)", default=0.5)
    nm: str | None = _h("N:M semi-structured sparsity instead, e.g. 2:4", default=None)
    targets: str = _h(
        "blocks (all linears in the transformer layers), mlp, attention, mlp+attention, all-linear or a comma list",
        default="blocks",
    )
    calib_batches: int = _h("calibration batches", default=8)
    calib_batch_size: int = _h("examples per calibration batch", default=16)
    max_length: int = _h("maximum tokens per example", default=128)
    sequential: bool = _h("calibrate each block on the already-pruned blocks before it (reference WANDA)", default=True)
    seed: int = _h("seed of the calibration subset", default=0)
    output: str = _h("folder for the masks, prune_report.json and the pruned model", default="runs/prune")
    save_model: bool = _h("also save the pruned backbone + tokenizer (save_pretrained, safetensors)", default=True)
    overwrite: bool = _h("replace an existing prune folder", default=False)
    trust_remote_code: bool = _h("allow model code from the hub", default=False)

    def config(self) -> PruneConfig:
        from ..compress.prune import PruneConfig

        return PruneConfig(
            sparsity=self.sparsity,
            nm=self.nm,
            targets=self.targets,
            calib_batches=self.calib_batches,
            sequential=self.sequential,
        )


def prune(args: PruneArgs) -> dict[str, Any]:
    """Run ``deft prune``; returns (and writes) the prune report."""
    from ..compress.prune import MASKS_NAME, save_masks, wanda_prune, weight_sparsity

    cfg = args.config()  # validate before loading anything heavy
    out = Path(args.output)
    if (out / REPORT_NAME).exists() and not args.overwrite:
        raise RunError(f"{out} already holds a prune run ({REPORT_NAME}); pass --overwrite or another --output")
    setup = task_setup(args, max_train_samples=args.calib_batches * args.calib_batch_size, max_eval_samples=1)
    model, tok = setup.model, setup.tokenizer_or_processor
    # calib_batches batches of a seeded subset (--seed) of the training set, collated as deft train collates them
    batches = list(input_batches(setup, args.calib_batch_size, setup.train_dataset))
    report = wanda_prune(model, batches, cfg)
    result = {
        **report.to_dict(),
        "weight_sparsity": weight_sparsity(model, "all-linear"),
        "args": asdict(args),
        "model_saved": args.save_model,
        "versions": versions(),
    }
    out.mkdir(parents=True, exist_ok=True)
    if args.save_model:
        # the backbone only: a classification / span / image head was freshly initialised, not pruned, and is
        # task-specific; a language model's head is the checkpoint's own and stays
        lm = setup.task_type in ("CAUSAL_LM", "SEQ_2_SEQ_LM")
        (model if lm else model.base_model).save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
    save_masks(
        report.masks,
        out / MASKS_NAME,
        metadata={"method": "wanda", "nm": str(cfg.nm), "sparsity": str(cfg.effective_sparsity)},
    )
    write_json(out / REPORT_NAME, result)  # last: its presence marks a finished prune run
    print(
        f"pruned {len(report.layers)} layers of {args.model}: weight sparsity {100 * report.overall:.2f} % "
        f"({'nm=' + cfg.nm if cfg.nm else 'unstructured'}, {report.calib_tokens} calibration tokens)"
    )
    print(f"masks:  {out / MASKS_NAME}\nreport: {out / REPORT_NAME}" + (f"\nmodel:  {out}" if args.save_model else ""))
    return result


# ---------------------------------------------------------------------------------------------- train wiring
_ModelT = TypeVar("_ModelT", bound="nn.Module")


def prepare_compressed_model(model: _ModelT, args: Any) -> tuple[_ModelT, dict[str, Any]]:
    """Apply ``args.prune_dir`` (WANDA masks, kept through training) and ``args.quantize`` (8 / 4) to a freshly
    loaded model, before ``apply_method``. Returns the model and a JSON-able summary for results.json.

    Missing attributes on ``args`` mean "off", so any object with some of ``prune_dir``, ``quantize``,
    ``quant_backend``, ``quant_group_size`` works.
    """
    from ..compress.prune import keep_pruned, load_masks, weight_sparsity
    from ..compress.quantize import QuantError, is_bnb_loaded, quant_config, quantize_model

    info: dict[str, Any] = {}
    prune_dir = getattr(args, "prune_dir", None)
    qcfg = quant_config(args)
    if prune_dir:
        if is_bnb_loaded(model):
            raise QuantError(
                "--prune-dir cannot mask a bitsandbytes-quantized model; load the pruned model "
                "instead: --model PRUNE_DIR (its zeros survive quantization)"
            )
        masks = load_masks(prune_dir)
        keep_pruned(model, masks)  # hooks live on the modules; nothing to keep a reference to
        report = Path(prune_dir) / REPORT_NAME
        info["prune"] = {"dir": str(prune_dir), "layers": len(masks)}
        if report.is_file():
            import json

            saved = json.loads(report.read_text())
            info["prune"].update(config=saved.get("config"), effective_sparsity=saved.get("effective_sparsity"))
    if qcfg is not None:
        q = quantize_model(model, qcfg)
        info["quant"] = {k: v for k, v in q.to_dict().items() if k != "layers"}
    if info:
        ws = weight_sparsity(model)
        info["weight_sparsity"] = {"overall": ws["overall"], "layers": ws["layers"]}
    return model, info
