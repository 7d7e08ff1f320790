"""The Pallas Triton backend: interpret-mode values and gradients against the reference."""

from safetriage_jax.kernels.grid_sample.test_base import GridSampleTestBase


class TestPallasTriton(GridSampleTestBase):
    IMPLEMENTATION = "pallas_triton"
