"""Configuration of the PEFT method DEFT trains with (one dataclass, validated on construction)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..errors import DeftError

METHODS: tuple[str, ...] = ("lora", "prefix", "prompt", "ia3", "bitfit", "adapter", "qlora")
ADAPTER_TYPES: tuple[str, ...] = ("pfeiffer", "houlsby")
LORA_BIAS: tuple[str, ...] = ("none", "lora_only", "all")  # peft's LoraConfig.bias
# Shorthands understood by `target_modules`; anything else is a comma-separated list of module names.
TARGET_SHORTHANDS: tuple[str, ...] = ("mlp+attention", "mlp", "attention", "all-linear")
TASK_TYPES: tuple[str, ...] = (
    "SEQ_CLS",
    "CAUSAL_LM",
    "SEQ_2_SEQ_LM",
    "QUESTION_ANS",
    "TOKEN_CLS",
    "IMAGE_CLS",
    "FEATURE_EXTRACTION",
)
# Activations a bottleneck adapter may use (the names transformers' ACT2FN knows).
ADAPTER_NON_LINEARITIES: tuple[str, ...] = (
    "relu",
    "gelu",
    "gelu_new",
    "silu",
    "swish",
    "tanh",
    "sigmoid",
    "leaky_relu",
    "mish",
    "quick_gelu",
)


class MethodError(DeftError, ValueError):
    """A method cannot be applied to this model (unsupported combination, missing dependency, bad checkpoint)."""


@dataclass
class MethodConfig:
    """Which PEFT method to train with, and its hyper-parameters.

    Only the fields of the chosen ``method`` are used; the others keep their defaults and are ignored.
    """

    method: str = field(
        default="lora",
        metadata={
            "help": f"PEFT method, one of {', '.join(METHODS)}. qlora needs a CUDA GPU and bitsandbytes.",
            "choices": METHODS,
        },
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (lora, qlora)."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling: the update is scaled by alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input, in [0, 1)."})
    lora_bias: str = field(
        default="lora_only",
        metadata={
            "help": "Which biases LoRA also trains (peft's `bias`): 'none', 'lora_only' (biases of the adapted "
            "modules; lets DEFT shift MLP units below zero directly) or 'all'.",
            "choices": LORA_BIAS,
        },
    )
    target_modules: str = field(
        default="mlp+attention",
        metadata={
            "help": "Modules LoRA adapts: 'mlp+attention' (default: MLP up/down projections and the attention "
            "projections, which DEFT needs to reshape the MLP activations), 'mlp', 'attention', 'all-linear' "
            "(every linear layer except the task head and the output embeddings), or a comma-separated list "
            "of module names or dotted name suffixes (e.g. 'query,value'). The task head is never adapted; "
            "it is trained fully."
        },
    )
    num_virtual_tokens: int = field(default=20, metadata={"help": "Number of virtual tokens (prefix, prompt)."})
    adapter_type: str = field(
        default="pfeiffer",
        metadata={
            "help": "Bottleneck adapter placement: 'pfeiffer' (after the MLP output projection) or 'houlsby' "
            "(also after the attention output projection).",
            "choices": ADAPTER_TYPES,
        },
    )
    adapter_reduction_factor: int = field(
        default=16, metadata={"help": "Adapter bottleneck = hidden size // factor (at least 1)."}
    )
    adapter_non_linearity: str = field(
        default="relu",
        metadata={"help": "Activation inside the adapter bottleneck.", "choices": ADAPTER_NON_LINEARITIES},
    )
    train_pooler: bool = field(
        default=False,
        metadata={
            "help": "Sequence classification only: also train the backbone's pooler (BERT / ALBERT: dense + tanh "
            "on the first token, feeding the classifier) fully, as RoBERTa's classification head trains its "
            "dense layer. Off (peft's default) keeps it frozen, which starves checkpoints whose pooler was never "
            "trained: all-MiniLM-L6-v2's has weights of std 0.009 and a zero bias."
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (list, tuple)):
            # accept a list too (handy from Python / YAML); stored as the comma form so JSON round trips are stable
            self.target_modules = ",".join(str(t).strip() for t in self.target_modules)
        self._check_choice("method", METHODS)
        self._check_choice("adapter_type", ADAPTER_TYPES)
        self._check_choice("lora_bias", LORA_BIAS)
        self._check_choice("adapter_non_linearity", ADAPTER_NON_LINEARITIES)
        self._check_int("lora_r", minimum=1)
        if not isinstance(self.train_pooler, bool):
            raise MethodError(f"train_pooler must be True or False, got {self.train_pooler!r}")
        self._check_int("num_virtual_tokens", minimum=1)
        self._check_int("adapter_reduction_factor", minimum=1)
        if not isinstance(self.lora_alpha, (int, float)) or isinstance(self.lora_alpha, bool) or self.lora_alpha <= 0:
            raise MethodError(f"lora_alpha must be a number > 0, got {self.lora_alpha!r}")
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise MethodError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not isinstance(self.target_modules, str) or not self.target_names():
            raise MethodError(
                f"target_modules must be one of {', '.join(TARGET_SHORTHANDS)} or a comma-separated list of "
                f"module names, got {self.target_modules!r}"
            )

    def _check_choice(self, name: str, choices: tuple[str, ...]) -> None:
        value = getattr(self, name)
        if value not in choices:
            raise MethodError(f"{name}={value!r} is not one of {', '.join(choices)}")

    def _check_int(self, name: str, minimum: int) -> None:
        value = getattr(self, name)
        # bool is an int subclass; `lora_r=True` is a mistake, not rank 1
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise MethodError(f"{name} must be an integer >= {minimum}, got {value!r}")

    def target_names(self) -> list[str]:
        """``target_modules`` split into its comma-separated entries (a shorthand is a one-entry list)."""
        return [t.strip() for t in self.target_modules.split(",") if t.strip()]

    @property
    def uses_peft(self) -> bool:
        """Whether the method is implemented by peft (the others are implemented in deft)."""
        return self.method in ("lora", "qlora", "prefix", "prompt", "ia3")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MethodError(
                f"unknown MethodConfig option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**data)
