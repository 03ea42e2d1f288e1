"""Compressing the frozen base before DEFT trains on it: WANDA pruning (:mod:`deft.compress.prune`) and
weight-only 8 / 4-bit quantization (:mod:`deft.compress.quantize`); :mod:`deft.compress.linears` selects
the linear layers both act on."""
