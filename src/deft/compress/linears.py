"""Which linear layers compression touches: the selection :mod:`deft.compress.prune` and
:mod:`deft.compress.quantize` share (so neither imports the other for it).

Names are *canonical*: without the ``base_layer`` components a peft tuner layer inserts, so a mask saved on
the bare model finds its layer again after ``apply_method``. The task head, the LM head (output embeddings)
and the adapters peft adds are never selected.
"""

from __future__ import annotations

from torch import nn

from ..arch import in_numbered_block, linear_types, mlp_spec, model_type, output_embeddings, unwrap_model
from ..errors import ConfigError

# The ``targets`` shorthands of compression. Not the same set as deft.methods.config.TARGET_SHORTHANDS (LoRA's
# ``target_modules``): "blocks" (every linear inside a numbered block, any architecture) exists only here,
# because it needs no entry in the MLP table, and compression (unlike LoRA) is the default on all of them.
COMPRESS_TARGET_SHORTHANDS: tuple[str, ...] = ("blocks", "mlp", "attention", "mlp+attention", "all-linear")
# Components peft adds inside a wrapped layer: never prune / count the adapter itself.
_PEFT_PARTS = ("lora_", "modules_to_save", "original_module")


def canonical_name(name: str) -> str:
    """``name`` without the ``base_layer`` components a peft tuner layer inserts, so a mask saved on the
    bare model finds its layer again after ``apply_method``."""
    return ".".join(p for p in name.split(".") if p != "base_layer")


def _is_peft_part(name: str) -> bool:
    return any(p.startswith(_PEFT_PARTS) for p in name.split("."))


def _head_prefixes(model: nn.Module) -> list[str]:
    """Top-level children that are not the backbone (task head, LM head): never compressed."""
    backbone = getattr(model, "base_model", model)
    if backbone is model:
        return []
    return [n for n, child in model.named_children() if child is not backbone]


def linear_layers(model: nn.Module, targets: str = "blocks") -> dict[str, nn.Module]:
    """Canonical name -> Linear / Conv1D module that ``targets`` selects (in model order).

    Works on a bare model and on a peft model (then the frozen base layers are returned, not the adapters).
    """
    base = unwrap_model(model)
    heads = _head_prefixes(base)
    out_emb = output_embeddings(base)
    kinds = linear_types()
    linears: dict[str, nn.Module] = {}
    for name, module in base.named_modules():
        if not isinstance(module, kinds) or module is out_emb or _is_peft_part(name):
            continue
        canon = canonical_name(name)
        if any(canon == h or canon.startswith(h + ".") for h in heads):
            continue
        linears[canon] = module
    entries = [t.strip() for t in targets.split(",") if t.strip()]
    if entries == ["all-linear"]:
        return linears
    if entries == ["blocks"]:
        return {n: m for n, m in linears.items() if in_numbered_block(n)}
    if len(entries) == 1 and entries[0] in ("mlp", "attention", "mlp+attention"):
        from ..methods.targets import attention_linear_names, mlp_linear_names

        if base is not model or any(".base_layer" in n for n, _ in base.named_modules()):
            raise ConfigError(f"targets={targets!r} needs the bare model; use targets='blocks' on a peft model")
        spec = mlp_spec(model_type(base))
        wanted: set[str] = set()
        if entries[0] in ("mlp", "mlp+attention"):
            wanted |= set(mlp_linear_names(base, spec))
        if entries[0] in ("attention", "mlp+attention"):
            wanted |= set(attention_linear_names(base, spec, heads))
        return {n: m for n, m in linears.items() if n in wanted}
    picked: dict[str, nn.Module] = {}
    for entry in entries:  # peft's list semantics: the name equals the entry or ends with "." + entry
        hits = {n: m for n, m in linears.items() if n == entry or n.endswith("." + entry)}
        if not hits:
            raise ConfigError(f"targets entry {entry!r} matches no Linear/Conv1D outside the head and embeddings")
        picked.update(hits)
    return {n: m for n, m in linears.items() if n in picked}
