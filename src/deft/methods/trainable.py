"""Counting, saving and loading the trainable part of a PEFT model.

A checkpoint directory holds ``adapter_model.safetensors`` (only the trainable weights) and
``deft_method.json`` (the :class:`MethodConfig`, the model type and the task type), which is enough to rebuild
the method on a fresh base model. For peft methods the directory is also a regular peft checkpoint
(``adapter_config.json`` is written too), loadable with ``PeftModel.from_pretrained``.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .apply import apply_method
from .config import MethodConfig, MethodError

WEIGHTS_NAME = "adapter_model.safetensors"
METHOD_NAME = "deft_method.json"
_FORMAT_VERSION = 1
# Substrings of the parameter names peft methods train (LoRA, IA3, the head copy peft keeps).
_PEFT_TRAINABLE_MARKERS = ("lora_", "ia3_l", "modules_to_save")


class ParamCount(NamedTuple):
    """Trainable and total parameter counts; ``percent`` = trainable / total * 100 (as the paper reports)."""

    trainable: int
    total: int
    percent: float

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


def _numel(param: torch.Tensor) -> int:
    # bitsandbytes packs two 4-bit values per byte of its storage dtype; count the logical parameters
    if param.__class__.__name__ == "Params4bit":
        itemsize = getattr(getattr(param, "quant_storage", None), "itemsize", 1)
        return param.numel() * 2 * itemsize
    return param.numel()


def count_parameters(model: nn.Module) -> ParamCount:
    """Count every distinct parameter of ``model`` (shared/tied ones once).

    The total includes what the method added (adapters, LoRA matrices, prompt encoders) and, for peft
    models, both the frozen original and the trainable copy of the task head (peft keeps both).
    """
    trainable = total = 0
    for param in model.parameters():  # .parameters() already de-duplicates tied weights
        n = _numel(param)
        total += n
        if param.requires_grad:
            trainable += n
    return ParamCount(trainable, total, 100.0 * trainable / total if total else 0.0)


def _is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def _atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` on a temp file next to ``path``, then move it over ``path`` in one step.

    A crash mid-save then leaves the previous checkpoint intact instead of a truncated file.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_trainable(
    model: nn.Module, out_dir: str | os.PathLike, cfg: MethodConfig, *, task_type: str | None = None
) -> Path:
    """Write the trainable weights of ``model`` and its method config to ``out_dir``; returns the directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if _is_peft(model):
        # peft knows how to name its own weights (and writes adapter_config.json); save into a scratch dir
        # inside `out` and move each file into place, so every file appears atomically
        scratch = Path(tempfile.mkdtemp(dir=out, prefix=".save-"))
        try:
            model.save_pretrained(scratch, safe_serialization=True)
            for f in scratch.iterdir():
                if f.is_file():
                    os.replace(f, out / f.name)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        peft_format = True
    else:
        tensors = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        if not tensors:
            raise MethodError("save_trainable: the model has no trainable parameters")
        _atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        peft_format = False
    record = {
        "deft_method_version": _FORMAT_VERSION,
        "method": cfg.to_dict(),
        "model_type": _model_type(model),
        "task_type": task_type,
        "peft_format": peft_format,
    }
    # written last: its presence marks a complete checkpoint
    _atomic_write(out / METHOD_NAME, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2) + "\n"))
    return out


def read_method(in_dir: str | os.PathLike) -> dict:
    """The parsed ``deft_method.json`` of a checkpoint directory (with ``method`` as a :class:`MethodConfig`)."""
    path = Path(in_dir) / METHOD_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no deft checkpoint at {path} (expected {METHOD_NAME} written by save_trainable)")
    try:
        record = json.loads(path.read_text())
        record["method"] = MethodConfig.from_dict(record["method"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise MethodError(f"corrupt deft checkpoint file {path}: {e}") from e
    return record


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"missing weights file {path}")
    try:
        return load_file(path)  # safetensors: no pickle, so no arbitrary code on load
    except (SafetensorError, OSError, ValueError) as e:
        raise MethodError(f"corrupt weights file {path}: {e}") from e


def load_trainable(base_model: nn.Module, in_dir: str | os.PathLike, *, task_type: str) -> nn.Module:
    """Rebuild the saved method on a fresh ``base_model`` and load its trainable weights."""
    in_dir = Path(in_dir)
    record = read_method(in_dir)
    cfg: MethodConfig = record["method"]
    saved_type, model_type = record.get("model_type"), _model_type(base_model)
    if saved_type is not None and model_type is not None and saved_type != model_type:
        raise MethodError(f"checkpoint {in_dir} was trained on model_type {saved_type!r}, got {model_type!r}")
    saved_task = record.get("task_type")
    if saved_task is not None and saved_task != task_type:
        raise MethodError(f"checkpoint {in_dir} was saved with task_type {saved_task!r}, got {task_type!r}")
    weights = _read_weights(in_dir / WEIGHTS_NAME)

    model = apply_method(base_model, cfg, task_type=task_type, warn_frozen_pooler=False)
    if _is_peft(model):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, weights)
        # peft loads prompt embeddings into the prompt encoder itself but still reports them as unexpected
        unexpected = [k for k in result.unexpected_keys if k != "prompt_embeddings"]
        # missing_keys lists every frozen base weight too; only the method's own weights matter
        missing = [k for k in result.missing_keys if any(t in k for t in _PEFT_TRAINABLE_MARKERS)]
        if cfg.method in ("prefix", "prompt") and "prompt_embeddings" not in weights:
            missing.append("prompt_embeddings")
        if unexpected or missing:
            raise MethodError(
                f"{in_dir / WEIGHTS_NAME} does not fit method={cfg.method!r} on model_type {model_type!r}: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        return model

    params = dict(model.named_parameters())
    wanted = {n for n, p in params.items() if p.requires_grad}
    missing, unexpected = sorted(wanted - weights.keys()), sorted(weights.keys() - params.keys())
    if missing or unexpected:
        raise MethodError(
            f"{in_dir / WEIGHTS_NAME} does not fit method={cfg.method!r} on model_type {model_type!r}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    with torch.no_grad():
        for name, tensor in weights.items():
            if params[name].shape != tensor.shape:
                raise MethodError(
                    f"{in_dir / WEIGHTS_NAME}: {name} has shape {tuple(tensor.shape)}, "
                    f"the model expects {tuple(params[name].shape)}"
                )
            params[name].copy_(tensor)
    return model
