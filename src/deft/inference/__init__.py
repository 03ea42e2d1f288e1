"""Changing a trained model for inference: skipping silent MLP blocks, swapping activations."""
