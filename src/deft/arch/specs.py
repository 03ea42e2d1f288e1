"""Architecture table: where each model family keeps its MLP pieces.

This is the one place that knows module names (like peft's ``utils/constants.py``). Everything else in
deft (the probe, adapters, LoRA targets, sparse inference) asks this table. Patterns are regular
expressions matched with ``re.search`` against the *full* dotted module name and anchored at the end, so
they work whether the model is bare, wrapped by a task head, or wrapped by peft
(``base_model.model.bert.encoder.layer.0...``).

Names were read off transformers 5.23 tiny models; where 5.x renamed a module (ViT's MLP moved to
``layers.N.mlp.activation_fn``) both spellings are accepted so older 5.x releases keep working.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import DeftError


@dataclass(frozen=True)
class MLPSpec:
    """Module-name patterns of one family's MLP block.

    act: the activation module whose *output* is ``O = f(X W1)``.
    down: the down-projection (W2). Its *input* is what a zero-skipping W2 actually sees; for a plain MLP
        it equals the activation output, for a gated MLP it is ``act(gate) * up``.
    up: the up-projection(s) W1 (for gated MLPs, the gate and up projections).
    attn_out: the attention output projection (Houlsby adapters go after it).
    gated: whether the MLP is gated (``act(X Wg) * (X Wu)``); ``None`` means "ask the config".
    """

    act: str
    down: str
    up: tuple[str, ...]
    attn_out: str
    gated: bool | None = False


_BERT = MLPSpec(
    act=r"layer\.\d+\.intermediate\.intermediate_act_fn",
    down=r"layer\.\d+\.output\.dense",
    up=(r"layer\.\d+\.intermediate\.dense",),
    attn_out=r"layer\.\d+\.attention\.output\.dense",
)
_LLAMA = MLPSpec(
    act=r"layers\.\d+\.mlp\.act_fn",
    down=r"layers\.\d+\.mlp\.down_proj",
    up=(r"layers\.\d+\.mlp\.gate_proj", r"layers\.\d+\.mlp\.up_proj"),
    attn_out=r"layers\.\d+\.self_attn\.o_proj",
    gated=True,
)
_BART = MLPSpec(  # also OPT: the activation lives on the decoder layer itself, not in an MLP submodule
    act=r"layers\.\d+\.activation_fn",
    down=r"layers\.\d+\.fc2",
    up=(r"layers\.\d+\.fc1",),
    attn_out=r"layers\.\d+\.self_attn\.out_proj",
)
_T5 = MLPSpec(
    act=r"block\.\d+\.layer\.\d+\.DenseReluDense\.act",
    down=r"block\.\d+\.layer\.\d+\.DenseReluDense\.wo",
    up=(r"block\.\d+\.layer\.\d+\.DenseReluDense\.wi(_0|_1)?",),
    attn_out=r"block\.\d+\.layer\.0\.SelfAttention\.o",
    gated=None,  # T5 v1.0 is ReLU, T5 v1.1 / Flan-T5 / mT5 are gated-GELU: config.is_gated_act decides
)

MLP_SPECS: dict[str, MLPSpec] = {
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "camembert": _BERT,
    "electra": _BERT,
    "distilbert": MLPSpec(
        act=r"layer\.\d+\.ffn\.activation",
        down=r"layer\.\d+\.ffn\.lin2",
        up=(r"layer\.\d+\.ffn\.lin1",),
        attn_out=r"layer\.\d+\.attention\.out_lin",
    ),
    "gpt2": MLPSpec(
        act=r"h\.\d+\.mlp\.act",
        down=r"h\.\d+\.mlp\.c_proj",
        up=(r"h\.\d+\.mlp\.c_fc",),
        attn_out=r"h\.\d+\.attn\.c_proj",
    ),
    "gpt_neox": MLPSpec(
        act=r"layers\.\d+\.mlp\.act",
        down=r"layers\.\d+\.mlp\.dense_4h_to_h",
        up=(r"layers\.\d+\.mlp\.dense_h_to_4h",),
        attn_out=r"layers\.\d+\.attention\.dense",
    ),
    "opt": _BART,
    "bart": _BART,
    "t5": _T5,
    "mt5": _T5,
    "vit": MLPSpec(
        act=r"(layers?\.\d+\.mlp\.activation_fn|layer\.\d+\.intermediate\.intermediate_act_fn)",
        down=r"(layers?\.\d+\.mlp\.fc2|layer\.\d+\.output\.dense)",
        up=(r"(layers?\.\d+\.mlp\.fc1|layer\.\d+\.intermediate\.dense)",),
        attn_out=r"(layers?\.\d+\.attention\.output\.dense|layers?\.\d+\.attention\.o_proj|layers?\.\d+\.self_attn\.o_proj)",
    ),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": _LLAMA,
    "phi": MLPSpec(
        act=r"layers\.\d+\.mlp\.activation_fn",
        down=r"layers\.\d+\.mlp\.fc2",
        up=(r"layers\.\d+\.mlp\.fc1",),
        attn_out=r"layers\.\d+\.self_attn\.dense",
    ),
}

SUPPORTED_MODEL_TYPES = tuple(sorted(MLP_SPECS))


class UnsupportedModelError(DeftError, ValueError):
    """Raised for a model type that is not in :data:`MLP_SPECS`."""


def mlp_spec(model_type: str | None) -> MLPSpec:
    """The :class:`MLPSpec` of ``model_type``, or a clear error that says how to proceed."""
    if model_type in MLP_SPECS:
        return MLP_SPECS[model_type]
    raise UnsupportedModelError(
        f"deft does not know where the MLP activations of model_type {model_type!r} are.\n"
        f"Supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}.\n"
        "Pass the activation modules yourself as name patterns (shell-style globs matched against "
        "model.named_modules()), e.g.\n"
        "    deft.ActivationProbe(model, sites=['*.layers.*.mlp.act_fn'])\n"
        "or, on the command line, --sites '*.layers.*.mlp.act_fn'."
    )


def is_gated(spec: MLPSpec, config) -> bool:
    if spec.gated is not None:
        return spec.gated
    return bool(getattr(config, "is_gated_act", False))


# Two ideas of "inside a transformer block". They agree on the linear layers of every family in the table
# (checked on the tiny models of deft.testing) but not on other architectures, so they keep two names:
#
# * BLOCK_STACK / in_block: under one of the stack names the table's families use. Every family's blocks
#   live in such a numbered stack; the linear layers inside a block (attention q/k/v/o and the MLP) are what
#   TEAL-style sparsity of all projections (deft.sparse, targets="all") swaps for its own modules, so it
#   stays with the stacks it knows.
# * NUMBERED_COMPONENT / in_numbered_block: any integer component (layer.3, h.0, block.1, blocks.2). What
#   WANDA pruning's "blocks" and quantization select, and what LoRA's "attention" shorthand takes from the
#   block: selecting weights needs no knowledge of the stack's name, so compression also works on model
#   types outside the table.
BLOCK_STACK = r"(^|\.)(layer|layers|h|block)\.\d+\."
NUMBERED_COMPONENT = re.compile(r"(^|\.)\d+(\.|$)")


def in_block(name: str) -> bool:
    """True when the dotted module ``name`` lies inside a numbered transformer block."""
    return re.search(BLOCK_STACK, name) is not None


def in_numbered_block(name: str) -> bool:
    """True when the dotted module ``name`` has an integer component (is, or lies inside, a repeated block)."""
    return NUMBERED_COMPONENT.search(name) is not None


def full_match(pattern: str, name: str) -> bool:
    """True when the dotted module ``name`` ends with a component sequence matching ``pattern``."""
    return re.search(rf"(^|\.){pattern}$", name) is not None


def layer_group(name: str, is_encoder_decoder: bool) -> str:
    """'encoder' / 'decoder' for encoder-decoder models (reported apart), else 'all'."""
    if not is_encoder_decoder:
        return "all"
    parts = name.split(".")
    if "decoder" in parts:
        return "decoder"
    if "encoder" in parts:
        return "encoder"
    return "all"
