"""Backward kernels of the TPU grid sample: d_image and d (pixel coordinates).

- ``d_image``: the transpose of the forward, ``M^T @ g``. Each grid step owns one window of
  the d_image of one image as a float32 VMEM-resident output block (privatised: no atomics,
  no scatter) and visits every output block of that image in turn (the last grid axis is
  sequential), adding ``M^T @ g`` only where the pre-pass says the block's taps touch the
  window. d_image is thereby tiled by row bands, so large feature maps fit in VMEM.
- ``d_coordinates``: the derivative matrices Dx, Dy (M with each tap weight replaced by its
  derivative along x, y) times the windows give d out / d x and d out / d y per pixel; the
  lane sum of their products with the cotangent is the gradient in pixel coordinates.
"""

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from safetriage_jax.kernels.grid_sample.pallas_mosaic_tpu_common import (
    NUM_TAPS, interpolation_matrix, interpolation_matrix_t, interpret_params, load_window)


def _d_image_kernel(first_ref, count_ref, index_ref, weight_ref, cotangent_ref, out_ref):
    b, window, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    window_pixels = out_ref.shape[1]

    @pl.when(j == 0)
    def _():
        out_ref[...] = jnp.zeros_like(out_ref)

    first = first_ref[b, j]

    @pl.when((window >= first) & (window < first + count_ref[b, j]))
    def _():
        matrix_t = interpolation_matrix_t(index_ref[0], weight_ref[0], window * window_pixels,
                                          window_pixels)
        out_ref[0] += jnp.dot(matrix_t, cotangent_ref[0].astype(jnp.float32),
                              preferred_element_type=jnp.float32)


def d_image(cotangent_BQC, plan, geometry, interpret):
    """(B, windows * R * W, C) float32: the forward's transpose applied to the cotangent."""
    g = geometry
    batch = cotangent_BQC.shape[0]
    tap_t_spec = pl.BlockSpec((1, NUM_TAPS, g.block_pixels), lambda b, k, j, *_: (b, 0, j))
    return pl.pallas_call(
        _d_image_kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(batch, g.num_windows, g.num_blocks),
            in_specs=[tap_t_spec, tap_t_spec,
                      pl.BlockSpec((1, g.block_pixels, g.channels), lambda b, k, j, *_: (b, j, 0))],
            out_specs=pl.BlockSpec((1, g.window_pixels, g.channels),
                                   lambda b, k, j, *_: (b, k, 0)),
        ),
        out_shape=jax.ShapeDtypeStruct((batch, g.padded_source_pixels, g.channels), jnp.float32),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret_params(interpret),
    )(plan.first_window_BJ, plan.num_windows_BJ, plan.index_BQ4.transpose(0, 2, 1),
      plan.weight_BQ4.transpose(0, 2, 1), cotangent_BQC)


def _d_coordinates_kernel(first_ref, count_ref, index_ref, d_dx_ref, d_dy_ref, cotangent_ref,
                          image_hbm, d_x_ref, d_y_ref, window_vmem, semaphore):
    b, j = pl.program_id(0), pl.program_id(1)
    window_pixels = window_vmem.shape[0]

    def add_window(i, accs):
        acc_x_PC, acc_y_PC = accs
        window = first_ref[b, j] + i
        load_window(image_hbm, b, window, window_vmem, semaphore)
        source_WC = window_vmem[...].astype(jnp.float32)
        offset = window * window_pixels
        d_x = interpolation_matrix(index_ref[0], d_dx_ref[0], offset, window_pixels)
        d_y = interpolation_matrix(index_ref[0], d_dy_ref[0], offset, window_pixels)
        return (acc_x_PC + jnp.dot(d_x, source_WC, preferred_element_type=jnp.float32),
                acc_y_PC + jnp.dot(d_y, source_WC, preferred_element_type=jnp.float32))

    zeros_PC = jnp.zeros(cotangent_ref.shape[1:], jnp.float32)
    acc_x_PC, acc_y_PC = jax.lax.fori_loop(0, count_ref[b, j], add_window, (zeros_PC, zeros_PC))
    cotangent_PC = cotangent_ref[0].astype(jnp.float32)
    d_x_ref[0] = jnp.sum(acc_x_PC * cotangent_PC, axis=1, keepdims=True)
    d_y_ref[0] = jnp.sum(acc_y_PC * cotangent_PC, axis=1, keepdims=True)


def d_coordinates(image_BPC, cotangent_BQC, plan, geometry, interpret):
    """(d x, d y), each (B, Q_padded) float32: the gradient in pixel coordinates."""
    g = geometry
    batch = image_BPC.shape[0]
    tap_spec = pl.BlockSpec((1, g.block_pixels, NUM_TAPS), lambda b, j, *_: (b, j, 0))
    column_spec = pl.BlockSpec((1, g.block_pixels, 1), lambda b, j, *_: (b, j, 0))
    column = jax.ShapeDtypeStruct((batch, g.padded_pixels, 1), jnp.float32)
    d_x, d_y = pl.pallas_call(
        _d_coordinates_kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(batch, g.num_blocks),
            in_specs=[tap_spec, tap_spec, tap_spec,
                      pl.BlockSpec((1, g.block_pixels, g.channels), lambda b, j, *_: (b, j, 0)),
                      pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=[column_spec, column_spec],
            scratch_shapes=[pltpu.VMEM((g.window_pixels, g.channels), image_BPC.dtype),
                            pltpu.SemaphoreType.DMA(())],
        ),
        out_shape=[column, column],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=interpret_params(interpret),
    )(plan.first_window_BJ, plan.num_windows_BJ, plan.index_BQ4, plan.dweight_dx_BQ4,
      plan.dweight_dy_BQ4, cotangent_BQC, image_BPC)
    return d_x[..., 0], d_y[..., 0]
