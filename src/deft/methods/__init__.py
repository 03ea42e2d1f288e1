"""The PEFT methods DEFT trains with: LoRA, QLoRA, prefix / prompt tuning, IA3 (via peft), BitFit and
bottleneck adapters (implemented here).

    cfg = MethodConfig(method="lora")                  # LoRA on the MLP and attention projections
    model = apply_method(model, cfg, task_type="SEQ_CLS")
    print(count_parameters(model))
    save_trainable(model, "out/", cfg, task_type="SEQ_CLS")
    model = load_trainable(fresh_base_model, "out/", task_type="SEQ_CLS")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import ADAPTER_TYPES, METHODS, TASK_TYPES, MethodConfig, MethodError

if TYPE_CHECKING:  # pragma: no cover
    from .adapters import AdapterWrapper, BottleneckAdapter
    from .apply import apply_method, qlora_available, qlora_quantization_config
    from .targets import head_module_names, pooler_module_name, resolve_targets
    from .trainable import ParamCount, count_parameters, load_trainable, read_method, save_trainable

# the modules that apply methods import peft and transformers: loaded on first use, so that MethodConfig (the
# option table of `deft train`) is cheap to import
_LAZY = {
    **dict.fromkeys(("AdapterWrapper", "BottleneckAdapter"), "adapters"),
    **dict.fromkeys(("apply_method", "qlora_available", "qlora_quantization_config"), "apply"),
    **dict.fromkeys(("head_module_names", "pooler_module_name", "resolve_targets"), "targets"),
    **dict.fromkeys(("ParamCount", "count_parameters", "load_trainable", "read_method", "save_trainable"), "trainable"),
}

__all__ = [
    "ADAPTER_TYPES",
    "AdapterWrapper",
    "BottleneckAdapter",
    "METHODS",
    "MethodConfig",
    "MethodError",
    "ParamCount",
    "TASK_TYPES",
    "apply_method",
    "count_parameters",
    "head_module_names",
    "load_trainable",
    "pooler_module_name",
    "qlora_available",
    "qlora_quantization_config",
    "read_method",
    "resolve_targets",
    "save_trainable",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
