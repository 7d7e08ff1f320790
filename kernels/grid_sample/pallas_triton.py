"""Pallas Triton (GPU) grid sampling: the forward kernel and the op's custom VJP.

Each program takes a block of output pixels x channels (powers of two, tails masked; sizes in
``config.TRITON``), computes the four taps of its pixels and gathers them from the flat image
with masked loads, accumulating in float32 (bfloat16 images are read as they are). The
backward is two kernels (``pallas_triton_vjp``): d_grid and d_image, separate so that XLA
drops d_image when the image needs no gradient. Semantics: ``reference``.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from safetriage_jax.kernels.grid_sample import pallas_triton_vjp
from safetriage_jax.kernels.grid_sample.config import TRITON
from safetriage_jax.kernels.grid_sample.pallas_triton_common import (
    PLATFORM, Dims, channel_offsets, check_int32_offsets, compiler_params, lanes, load_grid,
    PLATFORMS, source_coordinates, store, taps)
from safetriage_jax.kernels.grid_sample.platforms import kernel_or_interpreter

__all__ = ["PLATFORM", "grid_sample"]


def _forward_kernel(image_ref, grid_ref, out_ref, *, dims, block_p, block_c):
    pixel_P, pixel_ok_P = lanes(0, block_p, dims.num_pixels)
    channel_C, channel_ok_C = lanes(1, block_c, dims.channels)
    ix_P, iy_P = source_coordinates(*load_grid(grid_ref, pixel_P, pixel_ok_P), dims)
    out_PC = jnp.zeros((block_p, block_c), jnp.float32)
    for offset_P, weight_P, valid_P in taps(ix_P, iy_P, pixel_P, pixel_ok_P, dims):
        values_PC = plgpu.load(
            image_ref.at[channel_offsets(offset_P, channel_C, dims.channels)],
            mask=valid_P[:, None] & channel_ok_C[None, :], other=0.0)
        out_PC = out_PC + values_PC.astype(jnp.float32) * weight_P[:, None]
    store(out_ref, channel_offsets(pixel_P, channel_C, dims.channels),
          out_PC.astype(out_ref.dtype), pixel_ok_P[:, None] & channel_ok_C[None, :])


def forward(flat_image, flat_grid, dims, interpret):
    """(N * Ho * Wo * C,) samples of the flat image at the flat float32 grid, in its dtype."""
    config = TRITON["forward"]
    block_p, block_c = config.blocks(dims.channels)
    make_call = lambda interpret_flag: pl.pallas_call(
        functools.partial(_forward_kernel, dims=dims, block_p=block_p, block_c=block_c),
        out_shape=jax.ShapeDtypeStruct((dims.num_pixels * dims.channels,), flat_image.dtype),
        grid=(pl.cdiv(dims.num_pixels, block_p), pl.cdiv(dims.channels, block_c)),
        compiler_params=compiler_params(config), interpret=interpret_flag,
        name="grid_sample_forward")
    return kernel_or_interpreter(make_call, PLATFORMS, interpret, flat_image, flat_grid)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _sample(flat_image, flat_grid, dims, interpret):
    return forward(flat_image, flat_grid, dims, interpret)


def _sample_fwd(flat_image, flat_grid, dims, interpret):
    return _sample(flat_image, flat_grid, dims, interpret), (flat_image, flat_grid)


def _sample_bwd(dims, interpret, residuals, cotangent):
    flat_image, flat_grid = residuals
    d_grid = pallas_triton_vjp.d_grid(flat_image, flat_grid, cotangent, dims, interpret)
    d_image = pallas_triton_vjp.d_image(flat_grid, cotangent, dims, flat_image.dtype, interpret)
    return d_image, d_grid


_sample.defvjp(_sample_fwd, _sample_bwd)


def grid_sample(image_BHWC, grid_NHW2, *, padding_mode="zeros", align_corners=True,
                interpret=None):
    """Backend of ``api.grid_sample`` (same arguments and semantics as ``reference``).

    Raises NotImplementedError past int32 offsets. ``interpret=None`` compiles the kernels
    where the program is lowered for a GPU (CUDA, ROCm) and interprets them elsewhere (Pallas
    interpret mode, slow but exact), whatever the host's default backend.
    """
    check_int32_offsets(image_BHWC, grid_NHW2)
    interpret = None if interpret is None else bool(interpret)
    dims = Dims.of(image_BHWC, grid_NHW2, padding_mode, align_corners)
    flat_grid = grid_NHW2.astype(jnp.float32).reshape(-1)
    out = _sample(image_BHWC.reshape(-1), flat_grid, dims, interpret)
    return out.reshape(grid_NHW2.shape[:-1] + (dims.channels,))
