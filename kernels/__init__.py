"""Warp kernels: the grid-sample op, its plain-XLA reference and its Pallas backends (Triton for
GPUs, Mosaic for TPUs), chosen per call by ``grid_sample.api``.

Installed as ``safetriage_jax.kernels``; holds no model code.
"""
