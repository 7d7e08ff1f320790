"""Warp kernels: the grid-sample op, its plain-XLA reference and (later) Pallas backends.

Installed as ``safetriage_jax.kernels``; holds no model code.
"""
