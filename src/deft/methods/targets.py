"""Which modules a method touches: the task head (trained fully) and the linears LoRA / IA3 adapt.

Everything is resolved to *full* module names on the model about to be wrapped, then compressed into one
regular expression for peft (peft full-matches a string ``target_modules`` against each module name).
"""

from __future__ import annotations

import re

from torch import nn

from ..arch import MLPSpec, full_match, in_numbered_block, linear_types, mlp_spec, model_type, output_embeddings
from .config import MethodError

# Task types whose head is freshly initialised and must be trained fully (peft's modules_to_save).
HEAD_TASKS = frozenset({"SEQ_CLS", "QUESTION_ANS", "TOKEN_CLS", "IMAGE_CLS"})

# Leaf names of attention key/value projections (IA3 rescales these); fused qkv projections count too.
_KEY_VALUE_LEAF = re.compile(r"(k|v|key|value|k_proj|v_proj|k_lin|v_lin|c_attn|query_key_value|qkv|qkv_proj|Wqkv)")


def is_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` or a transformers ``Conv1D`` (GPT-2 style models: a transposed Linear)."""
    return isinstance(module, linear_types())


def linear_out_features(module: nn.Module) -> int:
    """Output width of a Linear or a transformers Conv1D (which calls it ``nf``)."""
    if isinstance(module, nn.Linear):
        return module.out_features
    nf = getattr(module, "nf", None)
    if nf is not None:
        return int(nf)
    raise TypeError(f"{type(module).__name__} is neither nn.Linear nor transformers Conv1D")


def head_module_names(model: nn.Module, task_type: str) -> list[str]:
    """Names of the task-head modules: the parameterised top-level children that are not the backbone.

    transformers task models are ``<backbone> + <head>`` (``bert`` + ``classifier``, ``model`` + ``score``,
    ``distilbert`` + ``pre_classifier`` + ``classifier``), and ``model.base_model`` is the backbone; so whatever
    else holds parameters at the top level is the head. Only task types with a freshly initialised head
    have one to train: an LM head is tied to (or as large as) the embeddings and stays frozen.
    """
    if task_type not in HEAD_TASKS:
        return []
    backbone = getattr(model, "base_model", model)
    if backbone is model:
        return []
    out_emb = output_embeddings(model)
    return [
        name
        for name, child in model.named_children()
        if child is not backbone and child is not out_emb and any(True for _ in child.parameters())
    ]


def pooler_module_name(model: nn.Module, task_type: str) -> str | None:
    """Full name of the backbone's pooler (BERT-style dense + tanh on the first token), if the classifier reads it.

    Only sequence classification goes through the pooler; transformers builds QA / token models without one.
    """
    if task_type != "SEQ_CLS":
        return None
    backbone = getattr(model, "base_model", model)
    pooler = getattr(backbone, "pooler", None)
    if backbone is model or not isinstance(pooler, nn.Module) or not any(True for _ in pooler.parameters()):
        return None
    return next((name for name, m in model.named_modules() if m is pooler), None)


def _under(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def mlp_linear_names(model: nn.Module, spec: MLPSpec) -> list[str]:
    """Full names of the MLP up-projection(s) and down-projection of every layer."""
    patterns = (*spec.up, spec.down)
    return [n for n, m in model.named_modules() if is_linear(m) and any(full_match(p, n) for p in patterns)]


def attention_linear_names(model: nn.Module, spec: MLPSpec, exclude: list[str]) -> list[str]:
    """Full names of the attention projections: the linears inside the transformer blocks that are not MLP.

    The constants table only names the attention *output* projection; the query/key/value spelling varies
    too much per family (query, q_proj, q, c_attn, query_key_value, q_lin) to list, and "every other linear
    of the block" is exactly the attention for all families in the table.
    """
    mlp = set(mlp_linear_names(model, spec))
    return [
        n
        for n, m in model.named_modules()
        if is_linear(m) and in_numbered_block(n) and n not in mlp and not _under(n, exclude)
    ]


def resolve_targets(model: nn.Module, target_modules: list[str], exclude: list[str]) -> list[str]:
    """Full names of the modules ``target_modules`` (shorthand or explicit list) selects, minus ``exclude``.

    ``exclude`` holds the task head: it is trained fully via modules_to_save, and peft refuses (or silently
    double-wraps) a module that is both a LoRA target and a module to save.
    """
    kind = model_type(model)
    out_emb = output_embeddings(model)
    exclude = list(exclude) + [n for n, m in model.named_modules() if out_emb is not None and m is out_emb]
    if len(target_modules) == 1 and target_modules[0] in ("mlp", "attention", "mlp+attention"):
        spec = mlp_spec(kind)
        what = target_modules[0]
        names: list[str] = []
        if what in ("mlp", "mlp+attention"):
            names += mlp_linear_names(model, spec)
        if what in ("attention", "mlp+attention"):
            names += attention_linear_names(model, spec, exclude)
    elif len(target_modules) == 1 and target_modules[0] == "all-linear":
        names = [n for n, m in model.named_modules() if is_linear(m)]
    else:
        # peft's list semantics: an entry matches a module whose name equals it or ends with "." + entry
        names = []
        for entry in target_modules:
            hits = [n for n, _ in model.named_modules() if n == entry or n.endswith("." + entry)]
            if not hits:
                raise MethodError(f"target_modules entry {entry!r} matches no module of model_type {kind!r}")
            names += hits
    names = sorted({n for n in names if not _under(n, exclude)})
    if not names:
        raise MethodError(f"target_modules={','.join(target_modules)!r} selects no module of model_type {kind!r}")
    return names


def key_value_names(names: list[str]) -> list[str]:
    """The attention key/value projections among ``names`` (by leaf name)."""
    return [n for n in names if _KEY_VALUE_LEAF.fullmatch(n.rsplit(".", 1)[-1])]


def names_to_regex(model: nn.Module, names: list[str]) -> str | list[str]:
    """A compact regex full-matching exactly ``names`` among the model's modules (or the list itself).

    Layer indices are generalised (``layer.0.output.dense`` -> ``layer\\.\\d+\\.output\\.dense``) so a 32-layer
    model gives 7 alternatives instead of 224 names in adapter_config.json. If the generalisation would
    over-match (e.g. a user targeted only some layers), the explicit list is returned instead.
    """
    alternatives = sorted(
        {r"\.".join(r"\d+" if part.isdigit() else re.escape(part) for part in n.split(".")) for n in names}
    )
    regex = "(?:" + "|".join(alternatives) + ")"
    matched = {n for n, _ in model.named_modules() if re.fullmatch(regex, n)}
    return regex if matched == set(names) else sorted(names)
