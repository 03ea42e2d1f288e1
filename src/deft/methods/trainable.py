"""Counting, saving and loading the trainable part of a PEFT model.

A checkpoint directory holds ``adapter_model.safetensors`` (only the trainable weights) and
``deft_method.json`` (the :class:`MethodConfig`, the model type and the task type), which is enough to rebuild
the method on a fresh base model. For peft methods the directory is also a regular peft checkpoint
(``adapter_config.json`` is written too), loadable with ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeGuard

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..arch import model_type
from ..errors import MissingFileError
from ..io import atomic_write, atomic_write_files
from .apply import apply_method
from .config import MethodConfig, MethodError

if TYPE_CHECKING:
    from peft import PeftModel

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


def _is_peft(model: nn.Module) -> TypeGuard[PeftModel]:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def _base_name(model: nn.Module) -> str | None:
    """The folder or hub id the base model was loaded from (transformers keeps it in the config)."""
    config = getattr(model, "config", None)
    get_base_model = getattr(model, "get_base_model", None)
    if config is None and get_base_model is not None:
        config = getattr(get_base_model(), "config", None)
    return getattr(config, "_name_or_path", None) or None


def save_trainable(
    model: nn.Module, out_dir: str | os.PathLike, cfg: MethodConfig, *, task_type: str | None = None
) -> Path:
    """Write the trainable weights of ``model`` and its method config to ``out_dir``; returns the directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if _is_peft(model):
        # peft knows how to name its own weights (and writes adapter_config.json); save into a scratch dir
        # inside `out` and move each file into place, so every file appears atomically
        atomic_write_files(out, lambda scratch: model.save_pretrained(str(scratch), safe_serialization=True))
        peft_format = True
    else:
        tensors = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        if not tensors:
            raise MethodError("save_trainable: the model has no trainable parameters")
        # atomic: a crash mid-save leaves the previous checkpoint intact instead of a truncated file
        atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
        peft_format = False
    record = {
        "deft_method_version": _FORMAT_VERSION,
        "method": cfg.to_dict(),
        "model_type": model_type(model),
        "base_model": _base_name(model),  # named in the error when the adapter is loaded on another model
        "task_type": task_type,
        "peft_format": peft_format,
    }
    # written last: its presence marks a complete checkpoint
    atomic_write(out / METHOD_NAME, lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))
    return out


def read_method(in_dir: str | os.PathLike) -> dict:
    """The parsed ``deft_method.json`` of a checkpoint directory (with ``method`` as a :class:`MethodConfig`)."""
    path = Path(in_dir) / METHOD_NAME
    if not path.is_file():
        raise MissingFileError(f"no deft checkpoint at {path} (expected {METHOD_NAME} written by save_trainable)")
    try:
        record = json.loads(path.read_text())
        record["method"] = MethodConfig.from_dict(record["method"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise MethodError(f"corrupt deft checkpoint file {path}: {e}") from e
    return record


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise MissingFileError(f"missing weights file {path}")
    try:
        return load_file(path)  # safetensors: no pickle, so no arbitrary code on load
    except (SafetensorError, OSError, ValueError) as e:
        raise MethodError(f"corrupt weights file {path}: {e}") from e


def _trained_on(in_dir: Path, record: dict) -> str | None:
    """The base model an adapter was trained on: deft's own record, else peft's adapter_config.json."""
    name = record.get("base_model")
    if not name:
        try:
            name = json.loads((in_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
        except (OSError, ValueError, AttributeError):
            name = None
    return name or None


def _mismatch(in_dir: Path, record: dict, base_model: nn.Module, detail: str) -> MethodError:
    """One line naming the adapter folder, the base it was trained on, the model given and what differs."""
    trained = _trained_on(in_dir, record)
    return MethodError(
        f"adapter {in_dir} does not fit the model {_base_name(base_model) or 'given'} "
        f"({f'it was trained on {trained}' if trained else 'trained on another base model'}): {detail}"
    )


# torch's load_state_dict message, one such clause per differing tensor
_SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape torch\.Size\(\[([^\]]*)\]\) from "
    r"checkpoint, the shape in current model is torch\.Size\(\[([^\]]*)\]\)"
)


def load_trainable(base_model: nn.Module, in_dir: str | os.PathLike, *, task_type: str) -> nn.Module:
    """Rebuild the saved method on a fresh ``base_model`` and load its trainable weights.

    An adapter trained on another base model raises one :class:`MethodError` naming the folder, both
    models and the first tensor whose shape differs."""
    in_dir = Path(in_dir)
    record = read_method(in_dir)
    cfg: MethodConfig = record["method"]
    saved_type, kind = record.get("model_type"), model_type(base_model)
    if saved_type is not None and kind is not None and saved_type != kind:
        raise _mismatch(in_dir, record, base_model, f"model_type {saved_type!r} there, {kind!r} here")
    saved_task = record.get("task_type")
    if saved_task is not None and saved_task != task_type:
        raise MethodError(f"checkpoint {in_dir} was saved with task_type {saved_task!r}, got {task_type!r}")
    weights = _read_weights(in_dir / WEIGHTS_NAME)

    model = apply_method(base_model, cfg, task_type=task_type, warn_frozen_pooler=False)
    if _is_peft(model):
        from peft import set_peft_model_state_dict

        try:
            # peft annotates the result as `namedtuple` (the factory); it is torch's _IncompatibleKeys
            result: Any = set_peft_model_state_dict(model, weights)
        except RuntimeError as e:
            sizes = _SIZE_MISMATCH.findall(str(e))
            if not sizes:
                raise
            name, saved, here = sizes[0]
            more = f" (and {len(sizes) - 1} more tensors)" if len(sizes) > 1 else ""
            raise _mismatch(
                in_dir, record, base_model, f"{name} has shape ({saved}) in the adapter, ({here}) in the model{more}"
            ) from None
        # peft loads prompt embeddings into the prompt encoder itself but still reports them as unexpected
        unexpected = [k for k in result.unexpected_keys if k != "prompt_embeddings"]
        # missing_keys lists every frozen base weight too; only the method's own weights matter
        missing = [k for k in result.missing_keys if any(t in k for t in _PEFT_TRAINABLE_MARKERS)]
        if cfg.method in ("prefix", "prompt") and "prompt_embeddings" not in weights:
            missing.append("prompt_embeddings")
        if unexpected or missing:
            raise _mismatch(
                in_dir, record, base_model, f"method={cfg.method!r}: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        return model

    params = dict(model.named_parameters())
    wanted = {n for n, p in params.items() if p.requires_grad}
    missing, unexpected = sorted(wanted - weights.keys()), sorted(weights.keys() - params.keys())
    if missing or unexpected:
        raise _mismatch(
            in_dir, record, base_model, f"method={cfg.method!r}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    with torch.no_grad():
        for name, tensor in weights.items():
            if params[name].shape != tensor.shape:
                raise _mismatch(
                    in_dir,
                    record,
                    base_model,
                    f"{name} has shape {tuple(tensor.shape)} in the adapter, {tuple(params[name].shape)} in the model",
                )
            params[name].copy_(tensor)
    return model
