"""Bilinear grid sampling (PyTorch ``F.grid_sample`` semantics), channels-last."""

from safetriage_jax.kernels.grid_sample.api import PADDING_MODES, grid_sample

__all__ = ["PADDING_MODES", "grid_sample"]
