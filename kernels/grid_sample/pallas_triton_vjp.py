"""Backward kernels of the Triton grid sample, and the interpret-mode fix for atomic adds.

- ``d_grid``: one program per block of output pixels loops over channel blocks and reduces
  ``cotangent * d(sample)/d(ix, iy)`` over channels; no atomics (each pixel owns its output).
  The chain to the normalised grid is the exact derivative of ``reference.source_coordinates``
  (zero on clamped borders, sign flips at reflections).
- ``d_image``: blocks of output pixels x channels scatter ``cotangent * weight`` to their four
  taps with float32 ``atomic_add`` into a zeroed buffer passed through
  ``input_output_aliases`` (Triton atomics have no bfloat16), cast to the image dtype after.
  Interpreted, it runs under ``interpret_atomic.scatter_add_scope`` (a JAX bug in how
  interpret mode adds atomically).

Both are separate ``pallas_call``s without side effects, so when the image needs no gradient
(a constant, or under ``stop_gradient``) the unused d_image call is dead code XLA removes.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from safetriage_jax.kernels.grid_sample import interpret_atomic
from safetriage_jax.kernels.grid_sample.config import TRITON
from safetriage_jax.kernels.grid_sample.pallas_triton_common import (
    PLATFORMS, channel_offsets, compiler_params, lanes, load_grid, source_coordinates, store,
    taps)
from safetriage_jax.kernels.grid_sample.platforms import kernel_or_interpreter


def _d_grid_kernel(image_ref, grid_ref, cotangent_ref, d_grid_ref, *, dims, block_p, block_c):
    pixel_P, pixel_ok_P = lanes(0, block_p, dims.num_pixels)
    gx_P, gy_P = load_grid(grid_ref, pixel_P, pixel_ok_P)
    ones_P = jnp.ones_like(gx_P)
    # ix depends on x only and iy on y only: one JVP gives both derivatives.
    (ix_P, iy_P), (dix_dgx_P, diy_dgy_P) = jax.jvp(
        lambda gx, gy: source_coordinates(gx, gy, dims), (gx_P, gy_P), (ones_P, ones_P))
    fx_P = ix_P - jnp.floor(ix_P)
    fy_P = iy_P - jnp.floor(iy_P)
    corners = taps(ix_P, iy_P, pixel_P, pixel_ok_P, dims)

    def add_channel_block(index, carry):
        d_ix_P, d_iy_P = carry
        channel_C = index * block_c + jnp.arange(block_c, dtype=jnp.int32)
        channel_ok_C = channel_C < dims.channels
        channel_C = jnp.where(channel_ok_C, channel_C, 0)
        cotangent_PC = plgpu.load(
            cotangent_ref.at[channel_offsets(pixel_P, channel_C, dims.channels)],
            mask=pixel_ok_P[:, None] & channel_ok_C[None, :], other=0.0).astype(jnp.float32)
        v00, v10, v01, v11 = (
            plgpu.load(image_ref.at[channel_offsets(offset_P, channel_C, dims.channels)],
                       mask=valid_P[:, None] & channel_ok_C[None, :],
                       other=0.0).astype(jnp.float32)
            for offset_P, _, valid_P in corners)
        d_ix_PC = (v10 - v00) * (1 - fy_P[:, None]) + (v11 - v01) * fy_P[:, None]
        d_iy_PC = (v01 - v00) * (1 - fx_P[:, None]) + (v11 - v10) * fx_P[:, None]
        return (d_ix_P + jnp.sum(cotangent_PC * d_ix_PC, axis=1),
                d_iy_P + jnp.sum(cotangent_PC * d_iy_PC, axis=1))

    zeros_P = jnp.zeros((block_p,), jnp.float32)
    d_ix_P, d_iy_P = jax.lax.fori_loop(0, pl.cdiv(dims.channels, block_c), add_channel_block,
                                       (zeros_P, zeros_P))
    store(d_grid_ref, 2 * pixel_P, d_ix_P * dix_dgx_P, pixel_ok_P)
    store(d_grid_ref, 2 * pixel_P + 1, d_iy_P * diy_dgy_P, pixel_ok_P)


def d_grid(flat_image, flat_grid, cotangent, dims, interpret):
    """Gradient of the loss with respect to the flat float32 grid, (2 * N * Ho * Wo,)."""
    config = TRITON["d_grid"]
    block_p, block_c = config.blocks(dims.channels)
    make_call = lambda interpret_flag: pl.pallas_call(
        functools.partial(_d_grid_kernel, dims=dims, block_p=block_p, block_c=block_c),
        out_shape=jax.ShapeDtypeStruct(flat_grid.shape, jnp.float32),
        grid=(pl.cdiv(dims.num_pixels, block_p),),
        compiler_params=compiler_params(config), interpret=interpret_flag,
        name="grid_sample_d_grid")
    return kernel_or_interpreter(make_call, PLATFORMS, interpret, flat_image, flat_grid,
                                 cotangent)


def _d_image_kernel(grid_ref, cotangent_ref, zeros_ref, d_image_ref, *, dims, block_p,
                    block_c):
    del zeros_ref  # the same buffer as d_image_ref (input_output_aliases)
    pixel_P, pixel_ok_P = lanes(0, block_p, dims.num_pixels)
    channel_C, channel_ok_C = lanes(1, block_c, dims.channels)
    ix_P, iy_P = source_coordinates(*load_grid(grid_ref, pixel_P, pixel_ok_P), dims)
    cotangent_PC = plgpu.load(
        cotangent_ref.at[channel_offsets(pixel_P, channel_C, dims.channels)],
        mask=pixel_ok_P[:, None] & channel_ok_C[None, :], other=0.0).astype(jnp.float32)
    for offset_P, weight_P, valid_P in taps(ix_P, iy_P, pixel_P, pixel_ok_P, dims):
        plgpu.atomic_add(d_image_ref, channel_offsets(offset_P, channel_C, dims.channels),
                         cotangent_PC * weight_P[:, None],
                         mask=valid_P[:, None] & channel_ok_C[None, :])


def d_image(flat_grid, cotangent, dims, image_dtype, interpret):
    """Gradient of the loss with respect to the flat image, in the image's dtype."""
    config = TRITON["d_image"]
    block_p, block_c = config.blocks(dims.channels)
    num_images = dims.num_pixels // dims.pixels_per_image
    zeros = jnp.zeros((num_images * dims.height * dims.width * dims.channels,), jnp.float32)

    def make_call(interpret_flag):
        call = pl.pallas_call(
            functools.partial(_d_image_kernel, dims=dims, block_p=block_p, block_c=block_c),
            out_shape=jax.ShapeDtypeStruct(zeros.shape, jnp.float32),
            grid=(pl.cdiv(dims.num_pixels, block_p), pl.cdiv(dims.channels, block_c)),
            input_output_aliases={2: 0}, compiler_params=compiler_params(config),
            interpret=interpret_flag, name="grid_sample_d_image")
        return interpret_atomic.scatter_add_scope(call) if interpret_flag else call

    d_image_f32 = kernel_or_interpreter(make_call, PLATFORMS, interpret, flat_grid, cotangent,
                                        zeros)
    return d_image_f32.astype(image_dtype)


