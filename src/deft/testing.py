"""Tiny random-init configs for every registered family (2 layers, hidden 32).

Used by the test suite and handy for users who want to try deft without weights.
"""

from __future__ import annotations

from typing import Any

from .errors import UnknownNameError

# Per-family overrides: each family spells "hidden size" / "layers" / "MLP width" differently.
_COMMON = dict(vocab_size=128, max_position_embeddings=64)
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "bert": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, **_COMMON),
    "roberta": dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=128,
        max_position_embeddings=66,
        pad_token_id=1,
    ),
    "electra": dict(
        hidden_size=32, embedding_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, **_COMMON
    ),
    "distilbert": dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64, **_COMMON),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=2, n_inner=64, vocab_size=128, n_positions=64),
    "gpt_neox": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, **_COMMON),
    "opt": dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64, word_embed_proj_dim=32, **_COMMON
    ),
    "t5": dict(
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        vocab_size=128,
        feed_forward_proj="relu",
    ),
    "mt5": dict(
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        vocab_size=128,
        feed_forward_proj="gated-gelu",
    ),
    "bart": dict(
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        **_COMMON,
    ),
    "vit": dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=16,
        patch_size=8,
        num_channels=3,
    ),
    "llama": dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        **_COMMON,
    ),
    "mistral": dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        **_COMMON,
    ),
    "qwen2": dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        **_COMMON,
    ),
    "gemma": dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        head_dim=16,
        **_COMMON,
    ),
    "phi": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, **_COMMON),
}


def tiny_config(model_type: str, **overrides: Any):
    """A transformers config of `model_type` with 2 layers and hidden size 32."""
    from transformers import AutoConfig

    if model_type not in TINY_CONFIGS:
        raise UnknownNameError(f"no tiny config for model_type {model_type!r}; known: {sorted(TINY_CONFIGS)}")
    return AutoConfig.for_model(model_type, **{**TINY_CONFIGS[model_type], **overrides})
