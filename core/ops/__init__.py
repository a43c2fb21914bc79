"""Tensor operations with no model knowledge: pruning scores and masks (pruning), uniform quantization (quantization)."""
