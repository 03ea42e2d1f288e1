"""``apply_method``: turn a transformers model into the PEFT model DEFT trains.

lora / qlora / prefix / prompt / ia3 go through peft; bitfit and bottleneck adapters are implemented here
(peft has neither). In every case the base weights are frozen and a freshly initialised task head
(classifier / score / qa_outputs) is trained fully.
"""

from __future__ import annotations

import importlib.util
import inspect
import warnings
from typing import Any, Literal, cast

import torch
from torch import nn

from ..arch import mlp_spec, model_type
from .adapters import BottleneckAdapter, insert_adapters
from .config import TASK_TYPES, MethodConfig, MethodError
from .targets import (
    head_module_names,
    key_value_names,
    mlp_linear_names,
    names_to_regex,
    pooler_module_name,
    resolve_targets,
)

QLORA_UNAVAILABLE = (
    "qlora needs a CUDA GPU and bitsandbytes (pip install bitsandbytes); on this machine use --method lora"
)


def qlora_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None


def _require_qlora() -> None:
    if not qlora_available():
        raise MethodError(QLORA_UNAVAILABLE)


def qlora_quantization_config():
    """The load-time quantization QLoRA uses: 4-bit NF4 base weights, double quantization, bf16 compute.

    Pass it to ``from_pretrained(..., quantization_config=qlora_quantization_config())``, then
    ``apply_method(model, MethodConfig(method="qlora"), ...)``.
    """
    _require_qlora()
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def _peft_task_type(task_type: str) -> str | None:
    # peft has no image-classification task type; the plain PeftModel plus modules_to_save does the job
    return None if task_type == "IMAGE_CLS" else task_type


def _get_peft_model(model: nn.Module, peft_config, cfg: MethodConfig, task_type: str) -> nn.Module:
    from peft import get_peft_model

    from ..console import quiet_loading

    try:
        with quiet_loading():  # peft's FutureWarning about transformers' renamed is_gradient_checkpointing
            return get_peft_model(model, peft_config)
    except (ValueError, TypeError, AttributeError, KeyError, NotImplementedError, RuntimeError) as e:
        raise MethodError(
            f"peft cannot apply method={cfg.method!r} to model_type={model_type(model)!r} "
            f"(task_type={task_type}): {type(e).__name__}: {e}"
        ) from e


def _lora_config(model: nn.Module, cfg: MethodConfig, task_type: str, heads: list[str]):
    from peft import LoraConfig

    targets = resolve_targets(model, cfg.target_names(), exclude=heads)
    return LoraConfig(
        task_type=_peft_task_type(task_type),
        r=cfg.lora_r,
        # peft annotates lora_alpha as int, but any number > 0 works (the update is scaled by alpha / r)
        lora_alpha=cfg.lora_alpha,  # type: ignore[arg-type]
        lora_dropout=cfg.lora_dropout,
        bias=cast(Literal["none", "all", "lora_only"], cfg.lora_bias),  # checked by MethodConfig
        target_modules=names_to_regex(model, targets),
        modules_to_save=heads or None,
    )


def _ia3_config(model: nn.Module, cfg: MethodConfig, task_type: str, heads: list[str]):
    from peft import IA3Config

    kind = model_type(model)
    spec = mlp_spec(kind)
    mlp = mlp_linear_names(model, spec)
    attention = resolve_targets(model, ["attention"], exclude=heads)
    kv = key_value_names(attention)
    if not mlp or not kv:
        raise MethodError(
            f"method='ia3' found no {'MLP projections' if not mlp else 'attention key/value projections'} "
            f"in model_type={kind!r}"
        )
    targets = sorted(set(mlp) | set(kv))
    return IA3Config(
        task_type=_peft_task_type(task_type),
        target_modules=names_to_regex(model, targets),
        # IA3 rescales the *input* of feed-forward modules and the output of the others
        feedforward_modules=names_to_regex(model, mlp),
        modules_to_save=heads or None,
    )


def _prompt_learning_config(model: nn.Module, cfg: MethodConfig, task_type: str, heads: list[str]):
    from peft import PrefixTuningConfig, PromptTuningConfig

    unsupported = (
        f"method={cfg.method!r} is not supported for model_type={model_type(model)!r} with task_type={task_type}"
    )
    if task_type == "IMAGE_CLS":
        raise MethodError(f"{unsupported}: it prepends virtual *token* embeddings; use lora, ia3, bitfit or adapter")
    if task_type == "SEQ_CLS" and getattr(model.config, "is_encoder_decoder", False):
        # BART/T5 classification heads locate the <eos> token in input_ids, which prompt learning replaces by
        # inputs_embeds (prompt) or breaks with a cache object (prefix, transformers 5)
        raise MethodError(
            f"{unsupported}: encoder-decoder classifiers need input_ids; use lora, ia3, bitfit or adapter"
        )
    backbones = (model, getattr(model, "base_model", model))
    takes_cache = any("past_key_values" in inspect.signature(m.forward).parameters for m in backbones)
    if cfg.method == "prefix" and not takes_cache:
        # peft only finds this out at the first forward pass; say it now
        raise MethodError(f"{unsupported}: prefix tuning needs a model that accepts past_key_values")
    # peft reads sizes from config.to_dict() under a few spellings; families like DistilBERT (dim, n_layers,
    # n_heads) only expose the canonical names through the config's attribute_map, so fill what peft would miss.
    config: Any = model.config  # a transformers PretrainedConfig
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    raw = text.to_dict()
    sizes: dict[str, Any] = {}
    for ours, theirs, spellings in (
        ("token_dim", "hidden_size", ("hidden_size", "n_embd", "d_model")),
        ("num_layers", "num_hidden_layers", ("num_hidden_layers", "num_layers", "n_layer")),
        (
            "num_attention_heads",
            "num_attention_heads",
            ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"),
        ),
    ):
        if not any(s in raw for s in spellings) and getattr(text, theirs, None) is not None:
            sizes[ours] = int(getattr(text, theirs))
    cls = PrefixTuningConfig if cfg.method == "prefix" else PromptTuningConfig
    return cls(
        task_type=_peft_task_type(task_type),
        num_virtual_tokens=cfg.num_virtual_tokens,
        modules_to_save=heads or None,
        **sizes,
    )


def _looks_untrained(module: nn.Module) -> bool:
    # a pretrained dense layer never ends with every bias exactly zero; a freshly initialised one does
    biases = [p for n, p in module.named_parameters() if n.endswith("bias")]
    return bool(biases) and all(bool((b == 0).all()) for b in biases)


def _train_heads(model: nn.Module, heads: list[str]) -> None:
    for name in heads:
        model.get_submodule(name).requires_grad_(True)


def apply_method(model: nn.Module, cfg: MethodConfig, *, task_type: str, warn_frozen_pooler: bool = True) -> nn.Module:
    """Apply ``cfg.method`` to ``model`` and return the model to train.

    peft methods return a ``PeftModel``; bitfit and adapter modify ``model`` in place and return it.
    Base weights are frozen; the task head (for SEQ_CLS, QUESTION_ANS, TOKEN_CLS, IMAGE_CLS) is trainable, and
    so is the backbone's pooler with ``cfg.train_pooler``; a frozen pooler that looks untrained is warned about
    unless ``warn_frozen_pooler`` is False (rebuilding an already trained model, where the advice is too late).
    Raises :class:`MethodError` for a combination that cannot work (naming the method and model type).
    """
    if task_type not in TASK_TYPES:
        raise MethodError(f"task_type={task_type!r} is not one of {', '.join(TASK_TYPES)}")
    heads = head_module_names(model, task_type)
    pooler = pooler_module_name(model, task_type)
    if pooler is not None and cfg.train_pooler:
        heads.append(pooler)  # trained fully, like the head (and kept out of LoRA's targets)
    elif pooler is not None and warn_frozen_pooler and _looks_untrained(model.get_submodule(pooler)):
        warnings.warn(
            f"{pooler} (model_type={model_type(model)!r}) looks untrained (all biases zero) and stays frozen: "
            "the classifier then sees a near-constant input and small tasks may not learn at all; "
            "pass train_pooler=True (CLI: --train-pooler)",
            stacklevel=2,
        )

    if cfg.method == "qlora":
        _require_qlora()
        if not (getattr(model, "is_loaded_in_4bit", False) or getattr(model, "hf_quantizer", None) is not None):
            raise MethodError(
                "method='qlora' expects a base model loaded in 4-bit: "
                "from_pretrained(..., quantization_config=deft.methods.qlora_quantization_config())"
            )
        from peft import prepare_model_for_kbit_training

        # No gradient checkpointing: it re-runs the forward pass in backward, so activation hooks (the
        # density probe) would fire twice per step.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        return _get_peft_model(model, _lora_config(model, cfg, task_type, heads), cfg, task_type)
    if cfg.method == "lora":
        return _get_peft_model(model, _lora_config(model, cfg, task_type, heads), cfg, task_type)
    if cfg.method == "ia3":
        return _get_peft_model(model, _ia3_config(model, cfg, task_type, heads), cfg, task_type)
    if cfg.method in ("prefix", "prompt"):
        return _get_peft_model(model, _prompt_learning_config(model, cfg, task_type, heads), cfg, task_type)

    model.requires_grad_(False)
    if cfg.method == "bitfit":
        # BitFit (Ben Zaken et al. 2022) trains every bias term, LayerNorm biases included
        biases = [
            p
            for n, p in model.named_parameters()
            if (n == "bias" or n.endswith(".bias")) and not any(n.startswith(h + ".") for h in heads)
        ]
        if not biases:  # then BitFit would silently degrade to training the head alone
            raise MethodError(
                f"method='bitfit' is not supported for model_type={model_type(model)!r}: "
                "it has no bias parameters outside the task head"
            )
        for p in biases:
            p.requires_grad_(True)
    elif cfg.method == "adapter":
        insert_adapters(
            model,
            mlp_spec(model_type(model)),
            adapter_type=cfg.adapter_type,
            reduction_factor=cfg.adapter_reduction_factor,
            non_linearity=cfg.adapter_non_linearity,
        )
        for module in model.modules():
            if isinstance(module, BottleneckAdapter):
                module.requires_grad_(True)
    else:  # pragma: no cover - MethodConfig validates `method`
        raise MethodError(f"unknown method {cfg.method!r}")
    _train_heads(model, heads)
    return model
