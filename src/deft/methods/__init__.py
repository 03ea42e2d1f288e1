"""The PEFT methods DEFT trains with: LoRA, QLoRA, prefix / prompt tuning, IA3 (via peft), BitFit and
bottleneck adapters (implemented here).

    cfg = MethodConfig(method="lora")                  # LoRA on the MLP and attention projections
    model = apply_method(model, cfg, task_type="SEQ_CLS")
    print(count_parameters(model))
    save_trainable(model, "out/", cfg, task_type="SEQ_CLS")
    model = load_trainable(fresh_base_model, "out/", task_type="SEQ_CLS")
"""

from __future__ import annotations

from .adapters import AdapterWrapper, BottleneckAdapter
from .apply import apply_method, qlora_available, qlora_quantization_config
from .config import ADAPTER_TYPES, METHODS, TASK_TYPES, MethodConfig, MethodError
from .targets import head_module_names, pooler_module_name, resolve_targets
from .trainable import ParamCount, count_parameters, load_trainable, read_method, save_trainable

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
