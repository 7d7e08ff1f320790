"""Backward kernels of the TPU grid sample: d_image and d (pixel coordinates).

- ``d_image``: the transpose of the forward, ``M^T @ g``. Each grid step owns one source
  window of the d_image of one image as a float32 VMEM-resident output block (privatised: no
  atomics, no scatter) and visits every output tile of that image in turn (the last grid axis
  is sequential), adding ``M^T @ g`` only where the pre-pass says the tile's taps touch the
  window (tiles that miss it map their input blocks to tile 0, so the pipeline does not fetch
  them). d_image is thereby tiled by windows, so large feature maps fit in VMEM.
- ``d_coordinates``: the derivative matrices Dx, Dy (M with each tap weight replaced by its
  derivative along x, y) times the windows give d out / d x and d out / d y per pixel; the
  lane sum of their products with the cotangent is the gradient in pixel coordinates.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from safetriage_jax.kernels.grid_sample.pallas_mosaic_tpu_common import (
    NUM_TAPS, interpolation_matrix, interpolation_matrix_t, interpret_params, load_window,
    num_windows_of, window_origin)


def _touches(owned_ref, b, window, j, geometry):
    """Whether tile ``j`` of image ``b`` has taps in aligned window ``window``."""
    window_row, window_col = window // geometry.window_grid[1], window % geometry.window_grid[1]
    first_row, first_col = owned_ref[0, b, j], owned_ref[2, b, j]
    return ((window_row >= first_row) & (window_row < first_row + owned_ref[1, b, j])
            & (window_col >= first_col) & (window_col < first_col + owned_ref[3, b, j]))


def _d_image_kernel(owned_ref, row_ref, col_ref, weight_ref, cotangent_ref, out_ref, *,
                    geometry):
    b, window, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)

    @pl.when(j == 0)
    def _():
        out_ref[...] = jnp.zeros_like(out_ref)

    @pl.when(_touches(owned_ref, b, window, j, geometry))
    def _():
        top = window // geometry.window_grid[1] * geometry.window_rows
        left = window % geometry.window_grid[1] * geometry.window_cols
        matrix_t = interpolation_matrix_t(row_ref[0], col_ref[0], weight_ref[0], top, left,
                                          geometry)
        out_ref[0, 0] += jnp.dot(matrix_t, cotangent_ref[0].astype(jnp.float32),
                                 preferred_element_type=jnp.float32)


def d_image(cotangent_BQC, plan, geometry, interpret):
    """(B, padded H, padded W, C) float32: the forward's transpose applied to the cotangent."""
    g = geometry
    batch = cotangent_BQC.shape[0]

    def tile_if_touching(b, window, j, owned_ref):
        # Tiles that miss the window map to tile 0: the pipeline fetches a block only when its
        # index changes, so a window reads about the tiles it needs, not all of the cotangent.
        return jnp.where(_touches(owned_ref, b, window, j, g), j, 0)

    tap_t_spec = pl.BlockSpec((1, NUM_TAPS, g.block_pixels),
                              lambda b, w, j, owned: (b, 0, tile_if_touching(b, w, j, owned)))
    by_window = pl.pallas_call(
        functools.partial(_d_image_kernel, geometry=g),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(batch, g.num_windows, g.num_blocks),
            in_specs=[tap_t_spec, tap_t_spec, tap_t_spec,
                      pl.BlockSpec((1, g.block_pixels, g.channels),
                                   lambda b, w, j, owned: (b, tile_if_touching(b, w, j, owned),
                                                           0))],
            out_specs=pl.BlockSpec((1, 1, g.window_pixels, g.channels),
                                   lambda b, w, j, *_: (b, w, 0, 0)),
        ),
        out_shape=jax.ShapeDtypeStruct((batch, g.num_windows, g.window_pixels, g.channels),
                                       jnp.float32),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret_params(interpret),
    )(plan.owned_4BJ, plan.row_BQ4.transpose(0, 2, 1), plan.col_BQ4.transpose(0, 2, 1),
      plan.weight_BQ4.transpose(0, 2, 1), cotangent_BQC)
    rows, cols = g.window_grid
    by_window = by_window.reshape(batch, rows, cols, g.window_rows, g.window_cols, g.channels)
    return jnp.swapaxes(by_window, 2, 3).reshape(batch, rows * g.window_rows,
                                                 cols * g.window_cols, g.channels)


def _d_coordinates_kernel(reads_ref, row_ref, col_ref, d_dx_ref, d_dy_ref, cotangent_ref,
                          image_hbm, d_x_ref, d_y_ref, window_vmem, semaphore, *, geometry):
    b, j = pl.program_id(0), pl.program_id(1)

    def add_window(i, accs):
        acc_x_PC, acc_y_PC = accs
        top, left = window_origin(reads_ref, b, j, i, geometry)
        load_window(image_hbm, b, top, left, window_vmem, semaphore, geometry)
        source_WC = window_vmem[...].astype(jnp.float32)
        d_x, d_y = (interpolation_matrix(row_ref[0], col_ref[0], d_ref[0], top, left, geometry)
                    for d_ref in (d_dx_ref, d_dy_ref))
        return (acc_x_PC + jnp.dot(d_x, source_WC, preferred_element_type=jnp.float32),
                acc_y_PC + jnp.dot(d_y, source_WC, preferred_element_type=jnp.float32))

    zeros_PC = jnp.zeros(cotangent_ref.shape[1:], jnp.float32)
    acc_x_PC, acc_y_PC = jax.lax.fori_loop(0, num_windows_of(reads_ref, b, j), add_window,
                                           (zeros_PC, zeros_PC))
    cotangent_PC = cotangent_ref[0].astype(jnp.float32)
    d_x_ref[0] = jnp.sum(acc_x_PC * cotangent_PC, axis=1, keepdims=True)
    d_y_ref[0] = jnp.sum(acc_y_PC * cotangent_PC, axis=1, keepdims=True)


def d_coordinates(image_BPC, cotangent_BQC, plan, geometry, interpret):
    """(d x, d y), each (B, padded pixels) float32 and tile-major: the gradient in pixels."""
    g = geometry
    batch = image_BPC.shape[0]
    tap_spec = pl.BlockSpec((1, g.block_pixels, NUM_TAPS), lambda b, j, *_: (b, j, 0))
    column_spec = pl.BlockSpec((1, g.block_pixels, 1), lambda b, j, *_: (b, j, 0))
    column = jax.ShapeDtypeStruct((batch, g.padded_pixels, 1), jnp.float32)
    d_x, d_y = pl.pallas_call(
        functools.partial(_d_coordinates_kernel, geometry=g),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(batch, g.num_blocks),
            in_specs=[tap_spec] * 4 + [
                pl.BlockSpec((1, g.block_pixels, g.channels), lambda b, j, *_: (b, j, 0)),
                pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=[column_spec, column_spec],
            scratch_shapes=[pltpu.VMEM((g.window_pixels, g.channels), image_BPC.dtype),
                            pltpu.SemaphoreType.DMA(())],
        ),
        out_shape=[column, column],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=interpret_params(interpret),
    )(plan.reads_4BJ, plan.row_BQ4, plan.col_BQ4, plan.dweight_dx_BQ4, plan.dweight_dy_BQ4,
      cotangent_BQC, image_BPC)
    return d_x[..., 0], d_y[..., 0]
