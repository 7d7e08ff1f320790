"""Bilinear grid sampling (PyTorch ``F.grid_sample`` semantics), channels-last.

``grid_sample`` is the one op the model warps with; ``reference`` states its semantics as plain
JAX, and each Pallas backend (one module per backend, its VJP beside it) reproduces them.
"""

from safetriage_jax.kernels.grid_sample.api import (IMPLEMENTATIONS, PADDING_MODES,
                                                    grid_sample)

__all__ = ["IMPLEMENTATIONS", "PADDING_MODES", "grid_sample"]
