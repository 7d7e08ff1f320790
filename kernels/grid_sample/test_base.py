"""One test base for every backend: values, d_image and d_grid against the reference.

Subclass it once per backend in ``tests/`` (set ``IMPLEMENTATION``; narrow ``CASES`` where a
backend's interpret mode is slow). Backends are called directly, never through the op's
fallback, so a backend that declines a case fails its test instead of passing as the reference.
The ``rng`` fixture (a seeded numpy Generator) comes from the tests' conftest.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from safetriage_jax.kernels.grid_sample import reference, specs
from safetriage_jax.kernels.grid_sample.api import IMPLEMENTATIONS

# Relative error of the whole tensor (||got - want|| / ||want||), per image dtype.
TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2}


def relative_error(actual, expected):
    expected = np.asarray(expected, np.float64)
    diff = np.asarray(actual, np.float64) - expected
    return float(np.linalg.norm(diff) / max(np.linalg.norm(expected), 1e-30))


@functools.partial(jax.jit, static_argnames=("sample",))
def value_and_grads(sample, image_BHWC, grid_NHW2, cotangent_NHWC):
    """(out, d_image, d_grid) of ``sample(image, grid)`` for one output cotangent."""
    out, vjp = jax.vjp(sample, image_BHWC, grid_NHW2)
    d_image, d_grid = vjp(cotangent_NHWC.astype(out.dtype))
    return out, d_image, d_grid


class GridSampleTestBase:
    """Compares ``IMPLEMENTATION`` with the reference on every case of ``CASES``."""

    IMPLEMENTATION = None
    INTERPRET = True
    CASES = specs.TEST_CASES

    def pytest_generate_tests(self, metafunc):
        if "case" in metafunc.fixturenames:
            metafunc.parametrize("case", self.CASES, ids=str)

    def backend(self, case):
        return functools.partial(IMPLEMENTATIONS[self.IMPLEMENTATION],
                                 padding_mode=case.padding_mode,
                                 align_corners=case.align_corners, interpret=self.INTERPRET)

    def test_values_and_gradients_match_reference(self, case, rng):
        image, grid, cotangent = specs.make_inputs(case, rng)
        got = value_and_grads(self.backend(case), jnp.asarray(image, case.dtype),
                              jnp.asarray(grid), jnp.asarray(cotangent))
        # The truth is the reference in float32 on the same (dtype-representable) image.
        truth = functools.partial(reference.grid_sample, padding_mode=case.padding_mode,
                                  align_corners=case.align_corners)
        want = value_and_grads(truth, jnp.asarray(image, jnp.float32), jnp.asarray(grid),
                               jnp.asarray(cotangent))
        assert got[0].dtype == jnp.dtype(case.dtype) and got[1].dtype == jnp.dtype(case.dtype)
        assert got[0].shape == want[0].shape and got[2].shape == grid.shape
        for what, actual, expected in zip(("value", "d_image", "d_grid"), got, want):
            error = relative_error(actual, expected)
            assert error < TOLERANCE[case.dtype], f"{what}: relative error {error:.2e}"
