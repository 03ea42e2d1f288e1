"""Changing a trained model for inference: skipping silent MLP blocks (:mod:`deft.inference.skip`,
ADA-DEFT) and swapping the MLP activation (:mod:`deft.inference.activations`, "relufication").
The zero-skipping kernels are :mod:`deft.sparse`."""
