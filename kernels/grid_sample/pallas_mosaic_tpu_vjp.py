"""Backward kernels of the TPU grid sample's pixel-major path (C >= 128): d_image and
d (pixel coordinates). The planar path (C < 128) has its own in ``pallas_mosaic_tpu_planar``.

- ``d_image``: the transpose of the forward, ``M^T @ g``. Each grid step owns one source
  window of the d_image of one image as a float32 VMEM-resident output block (privatised: no
  atomics, no scatter) and visits every output tile of that image in turn (the last grid axis
  is sequential), adding ``M^T @ g`` only where the pre-pass says the tile's taps touch the
  window (tiles that miss it map their input blocks to tile 0, so the pipeline does not fetch
  them). d_image is thereby tiled by windows, so large feature maps fit in VMEM.
- ``d_coordinates``: with the derivative matrices Dx, Dy (M with each tap weight replaced by
  its derivative along x, y), the gradient in pixel coordinates of pixel p is
  sum_c (Dx @ window)[p, c] g[p, c] = sum_w Dx^T[w, p] (window @ g^T)[w, p]: one
  (window pixels x P) matmul per window, shared by x and y, and a sublane sum, written
  lane-dense as (2, P).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from safetriage_jax.kernels.grid_sample.pallas_mosaic_tpu_common import (
    NUM_TAPS, contract, interpolation_matrix_t, interpret_params, load_window, num_windows_of,
    pixel_values_spec, window_origin)
from safetriage_jax.kernels.grid_sample.platforms import kernel_or_interpreter

PLATFORM = "tpu"


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
        matrix_t_WP = interpolation_matrix_t(row_ref[0], col_ref[0], weight_ref[0], top, left,
                                             geometry)
        out_ref[0, 0] += contract(matrix_t_WP, cotangent_ref[0], 1, 0)  # (W, C) += M^T @ g


def d_image(cotangent_BPC, plan, geometry, interpret):
    """(B, padded H, padded W, C) float32: the forward's transpose applied to the cotangent
    (``cotangent_BPC``: (B, padded pixels, C), tile-major)."""
    g = geometry
    batch = cotangent_BPC.shape[0]
    window_block = (g.window_pixels, g.channels)

    def tile_if_touching(b, window, j, owned_ref):
        # Tiles that miss the window map to tile 0: the pipeline fetches a block only when its
        # index changes, so a window reads about the tiles it needs, not all of the cotangent.
        return jnp.where(_touches(owned_ref, b, window, j, g), j, 0)

    tap_t_spec = pl.BlockSpec((1, NUM_TAPS, g.block_pixels),
                              lambda b, w, j, owned: (b, 0, tile_if_touching(b, w, j, owned)))
    make_call = lambda interpret_flag: pl.pallas_call(
        functools.partial(_d_image_kernel, geometry=g),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(batch, g.num_windows, g.num_blocks),
            in_specs=[tap_t_spec, tap_t_spec, tap_t_spec,
                      pixel_values_spec(g, lambda b, w, j, owned: (
                          b, tile_if_touching(b, w, j, owned)))],
            out_specs=pl.BlockSpec((1, 1) + window_block, lambda b, w, j, *_: (b, w, 0, 0)),
        ),
        out_shape=jax.ShapeDtypeStruct((batch, g.num_windows) + window_block, jnp.float32),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret_params(interpret_flag))
    by_window = kernel_or_interpreter(
        make_call, (PLATFORM,), interpret, plan.owned_4BJ, plan.row_B4Q, plan.col_B4Q,
        plan.weight_B4Q, cotangent_BPC)
    rows, cols = g.window_grid
    by_window = by_window.reshape(batch, rows, cols, g.window_rows, g.window_cols, g.channels)
    return jnp.swapaxes(by_window, 2, 3).reshape(batch, rows * g.window_rows,
                                                 cols * g.window_cols, g.channels)


def _d_coordinates_kernel(reads_ref, row_ref, col_ref, d_dx_ref, d_dy_ref, cotangent_ref,
                          image_hbm, d_xy_ref, window_vmem, semaphore, *, geometry):
    b, j = pl.program_id(0), pl.program_id(1)

    def add_window(i, acc_2P):
        top, left = window_origin(reads_ref, b, j, i, geometry)
        load_window(image_hbm, b, top, left, window_vmem, semaphore, geometry)
        # (window pixels, P): each window pixel's values against each pixel's cotangent.
        products_WP = contract(window_vmem[...], cotangent_ref[0], 1, 1)
        d_x_1P, d_y_1P = (
            jnp.sum(interpolation_matrix_t(row_ref[0], col_ref[0], d_ref[0], top, left,
                                           geometry) * products_WP, axis=0, keepdims=True)
            for d_ref in (d_dx_ref, d_dy_ref))
        return acc_2P + jnp.concatenate([d_x_1P, d_y_1P], axis=0)

    acc_2P = jax.lax.fori_loop(0, num_windows_of(reads_ref, b, j), add_window,
                               jnp.zeros(d_xy_ref.shape[1:], jnp.float32))
    d_xy_ref[0] = acc_2P


def d_coordinates(image_BPC, cotangent_BPC, plan, geometry, interpret):
    """(d x, d y), each (B, padded pixels) float32 and tile-major: the gradient in pixels
    (``image_BPC`` from ``flat_read_image``, ``cotangent_BPC`` (B, padded pixels, C),
    tile-major)."""
    g = geometry
    batch = image_BPC.shape[0]
    tap_spec = pl.BlockSpec((1, NUM_TAPS, g.block_pixels), lambda b, j, *_: (b, 0, j))
    make_call = lambda interpret_flag: pl.pallas_call(
        functools.partial(_d_coordinates_kernel, geometry=g),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(batch, g.num_blocks),
            in_specs=[tap_spec] * 4 + [
                pixel_values_spec(g, lambda b, j, *_: (b, j)),
                pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=pl.BlockSpec((1, 2, g.block_pixels), lambda b, j, *_: (b, 0, j)),
            scratch_shapes=[pltpu.VMEM((g.window_pixels, g.channels), image_BPC.dtype),
                            pltpu.SemaphoreType.DMA(())],
        ),
        out_shape=jax.ShapeDtypeStruct((batch, 2, g.padded_pixels), jnp.float32),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=interpret_params(interpret_flag))
    d_xy_B2Q = kernel_or_interpreter(
        make_call, (PLATFORM,), interpret, plan.reads_4BJ, plan.row_B4Q, plan.col_B4Q,
        plan.dweight_dx_B4Q, plan.dweight_dy_B4Q, cotangent_BPC, image_BPC)
    return d_xy_B2Q[:, 0], d_xy_B2Q[:, 1]
