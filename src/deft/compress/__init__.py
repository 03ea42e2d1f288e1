"""Compressing the frozen base: WANDA pruning and weight-only quantization."""
