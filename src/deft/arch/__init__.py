"""What deft knows about model architectures: the MLP table (:mod:`deft.arch.specs`) and the small
``nn.Module`` helpers every layer above uses (:mod:`deft.arch.nn`)."""

from __future__ import annotations

from .nn import (
    conv1d_type,
    eval_mode,
    is_conv1d,
    linear_types,
    model_device,
    model_type,
    module_bias,
    module_weight,
    output_embeddings,
    run_batches,
    set_submodule,
    to_device,
    unwrap_model,
    weight_out_in,
)
from .specs import (
    BLOCK_STACK,
    MLP_SPECS,
    NUMBERED_COMPONENT,
    SUPPORTED_MODEL_TYPES,
    MLPSpec,
    UnsupportedModelError,
    full_match,
    in_block,
    in_numbered_block,
    is_gated,
    layer_group,
    mlp_spec,
)

__all__ = [
    "BLOCK_STACK",
    "MLP_SPECS",
    "NUMBERED_COMPONENT",
    "SUPPORTED_MODEL_TYPES",
    "MLPSpec",
    "UnsupportedModelError",
    "conv1d_type",
    "eval_mode",
    "full_match",
    "in_block",
    "in_numbered_block",
    "is_conv1d",
    "is_gated",
    "layer_group",
    "linear_types",
    "mlp_spec",
    "model_device",
    "model_type",
    "module_bias",
    "module_weight",
    "output_embeddings",
    "run_batches",
    "set_submodule",
    "to_device",
    "unwrap_model",
    "weight_out_in",
]
