"""Compiler truth on the CPU: the warp kernels and the small train step compiled by the real TPU
(libtpu: XLA:TPU + Mosaic) and H100 (XLA:GPU + Triton + ptxas) compilers, no device needed.

Marked ``aot`` and skipped unless the tpu-aot / gpu-aot extras are installed:
``pip install -e '.[tpu-aot,gpu-aot]' && pytest -m aot``. On 2 shared cores: ~5 min without
the train steps (``-k "not train_step"``); the v5e train step alone took 22 min.
"""

import functools

import jax
import jax.numpy as jnp
import pytest

from safetriage_jax import aot
from safetriage_jax.kernels.grid_sample import api, pallas_mosaic_tpu, pallas_triton

pytestmark = pytest.mark.aot
GIB = 2 ** 30


def needs(target):
    reason = aot.missing_extra(target)
    return pytest.mark.skipif(reason is not None, reason=reason or "")


def _warp_gradient(sample):
    """Gradient of a loss to image and grid through ``sample``: forward, d_image, d_grid."""
    def loss(image, grid):
        return jnp.sum(sample(image, grid).astype(jnp.float32) ** 2)
    return jax.grad(loss, argnums=(0, 1))


def _small_warp(target, channels, dtype):
    """Image (2, 24, 40, C) sampled by two grids each onto 16 x 24 pixels, on ``target``."""
    return (aot.abstract((2, 24, 40, channels), dtype, target),
            aot.abstract((4, 16, 24, 2), jnp.float32, target))


@pytest.mark.parametrize("target", [pytest.param("v5e", marks=needs("v5e")),
                                    pytest.param("v6e", marks=needs("v6e"))])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("channels", [3, 128, 256, 512])
def test_mosaic_kernels_compile_for_tpu(target, dtype, channels):
    """Mosaic accepts the forward, d_image and d_grid kernels (aligned window DMAs)."""
    sample = functools.partial(pallas_mosaic_tpu.grid_sample, padding_mode="reflection",
                               align_corners=False)  # interpret=None: the lowering decides
    lowered, compiled, _ = aot.compile_for(target, _warp_gradient(sample),
                                           *_small_warp(target, channels, dtype))
    assert lowered.as_text().count("tpu_custom_call") == 3
    assert compiled.as_text().count("custom-call") >= 3


@needs("h100")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("channels", [3, 64, 128, 256, 512])
def test_triton_kernels_compile_for_h100_without_spills(dtype, channels):
    """XLA:GPU compiles the three Triton kernels for sm_90a and ptxas spills no register."""
    sample = functools.partial(pallas_triton.grid_sample, padding_mode="border")
    _, _, _, report = aot.compile_with_ptxas(_warp_gradient(sample),
                                             *_small_warp("h100", channels, dtype))
    assert set(report) == {"grid_sample_forward", "grid_sample_d_image", "grid_sample_d_grid"}
    for kernel, figures in report.items():
        assert figures["spill_stores"] == 0 and figures["spill_loads"] == 0, (kernel, figures)


# The XLA reference warp's temporaries at the dense-motion shape on v5e (float32, jax 0.10.2,
# libtpu 0.0.42.1, experiments/aot_compile.py, 2026-12-03, compiled, not run): forward
# 0.675 GiB, forward + backward 4.345 GiB. The ceiling: the kernels' forward AND backward
# together need no more than XLA's forward alone (the planar path, C < 128, measured 0.000 GiB;
# the pixel-major code for every C 0.238 GiB; before the lane-dense layouts, 6.47 GiB forward
# and 11.1 GiB with the backward).
CEILING_GIB = 0.675


@needs("v5e")
def test_dense_motion_warp_at_batch_28_needs_no_more_than_the_xla_warp_on_v5e():
    """Lane-dense plan arrays: the Mosaic warp's forward + backward temporaries at the model's
    dense-motion shape (28 images, 11 grids each, 64 x 64, C = 3) stay under the XLA warp's."""
    image = aot.abstract((28, 64, 64, 3), jnp.float32, "v5e")
    grid = aot.abstract((28 * 11, 64, 64, 2), jnp.float32, "v5e")
    sample = functools.partial(pallas_mosaic_tpu.grid_sample)
    _, compiled, _ = aot.compile_for("v5e", _warp_gradient(sample), image, grid)
    temporaries = aot.memory(compiled)["temporaries"] / GIB
    assert temporaries <= CEILING_GIB, temporaries


@pytest.mark.parametrize("target,implementation,call", [
    pytest.param("v5e", "pallas_mosaic_tpu", "tpu_custom_call", marks=needs("v5e")),
    pytest.param("h100", "pallas_triton", "__gpu$xla.gpu.triton", marks=needs("h100")),
])
def test_small_train_step_compiles_with_the_kernels(target, implementation, call):
    """The `small` config's whole train step compiles with the target's kernels as every warp
    (interpret=None resolved by the lowering platform: no interpreter in the program)."""
    from safetriage_jax.models.config import load_python_config
    from safetriage_jax.train import step
    config = load_python_config("configs/train.py:small")
    config.train.update(batch_size=2, perceptual_weights="random")
    config.train.warp_implementation = implementation
    sharding = jax.sharding.NamedSharding(aot.mesh(target), jax.sharding.PartitionSpec())
    # Deviceless XLA:GPU (jax 0.10.2) cannot tile the `small` config's tiny float32 GEMMs as
    # Triton fusions ("Couldn't find output tile sizes", f32[6,3] in affine_grid, with xla or
    # Pallas warps alike): compile those with cuBLAS instead.
    options = {"xla_gpu_enable_triton_gemm": False} if target == "h100" else None
    with aot.lowering_for(target):
        lowered = step.lower_train_step(config, 2, sharding=sharding)
        compiled = lowered.compile(compiler_options=options)
    text = lowered.as_text()
    assert text.count(call) >= 10  # dense motion, generator levels, deformed, equivariance
    assert "callback" not in text  # no interpreter (its DMAs are host callbacks) left
    assert aot.memory(compiled)["total"] > 0
    assert api.IMPLEMENTATIONS[implementation]  # the backend imported here
