"""The TPU warp for images of fewer than 128 channels: planar images, separable weights.

A (B, H, W, C < 128) image in HBM would put C on the 128-wide lane axis (padded 128 / C
times), so this path keeps it channel-major, ``(B, C, rows, cols)``: the last two dims are
the (8|16, 128)-tiled ones and nothing is padded but rows to a multiple of 16 and columns to
a multiple of 128. A window is ``(C, window_rows, window_cols)``, one DMA, its top on a
multiple of ``ROW_STEP`` and its left column on a multiple of 128 (Mosaic DMAs start on whole
tiles); where the image is smaller than a window the window is clamped into it and claims only
the taps from its nominal start on, so overlapping windows never count a tap twice.

Output tiles are 8 rows x up to 128 columns of the (B, C, T * Ho, Wo) output plane, written in
place as (C, 8, cols) blocks, and the backward reads the cotangent in the same layout: with
XLA's planar layout for these arrays the transposes to and from (B, T * Ho, Wo, C) are free.
A tile is processed one output row (P = its columns) at a time.

Bilinear weights are separable: tap (x, y) has weight wx(x) * wy(y), wx = 0 (wy = 0) for a
tap column (row) outside the image, which is the reference's product-with-inside-mask exactly;
its derivatives are dwx * wy and wx * dwy (dwx = -1 at x0, +1 at x1, inside). Per window and
output row the kernels build a column matrix ``col_weight_WP`` (window cols x P) and a row
matrix ``row_weight_RP`` (window rows x P) from the pixels' coordinates, and

- forward: ``A = window(C * rows, cols) @ col_weight_WP``; ``out(C, P) = sum_r row_weight * A``;
- d_image (per owned aligned window): ``((row_weight * g)(C * rows, P)) @ col_weight^T``;
- d_coordinates: ``d_x = sum_c g sum_r row_weight * (window @ dcol_weight)``,
  ``d_y = sum_c g sum_r drow_weight * (window @ col_weight)``.

The only per-pixel input is the (B, 2, pixels) source coordinates (x, y), lane-dense; the
taps, weights and derivatives are recomputed in the kernels.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from safetriage_jax.kernels.grid_sample.pallas_mosaic_tpu_common import (
    LANES, PLANAR_ROW_STEP, contract, interpret_params, to_blocks)
from safetriage_jax.kernels.grid_sample.platforms import kernel_or_interpreter

PLATFORM = "tpu"
ROW_STEP = PLANAR_ROW_STEP  # window tops: whole (16, 128) bf16 tiles (and (8, 128) f32 ones)
COL_STEP = LANES    # window left columns: whole 128-lane tiles
OUTSIDE = -4.0      # coordinate of padding pixels: all four taps outside any image


def round_up(value, step):
    return -(-value // step) * step


def image_rows(geometry):
    return round_up(geometry.height, ROW_STEP)


def image_cols(geometry):
    return round_up(geometry.width, COL_STEP)


def planar_image(image_BHWC, geometry):
    """(B, C, rows, cols): the image channel-major, zeros below and right of it."""
    g = geometry
    padded = jnp.pad(image_BHWC, ((0, 0), (0, image_rows(g) - g.height),
                                  (0, image_cols(g) - g.width), (0, 0)))
    return padded.transpose(0, 3, 1, 2)


@dataclasses.dataclass(frozen=True)
class PlanarPlan:
    """The pre-pass's arrays, pixels tile-major (``to_blocks``) on the lane axis."""
    xy_B2Q: jax.Array       # source x, y in pixels; OUTSIDE in padding pixels
    reads_4BJ: jax.Array    # int32 per tile: nominal top row of its windows, how many down,
                            # nominal left column, how many across (aligned to the steps)
    owned_4BJ: jax.Array    # in d_image's aligned window grid: first window row, count,
                            # first window column, count


def _tap_span(coord_BJP, size):
    """Per tile: lowest and highest tap (of x0, x0 + 1) inside [0, size), and whether a pixel
    has one; ``coord_BJP`` per tile (B, tiles, P)."""
    first = jnp.floor(coord_BJP)
    inside0 = (first >= 0) & (first <= size - 1)
    inside1 = (first + 1 >= 0) & (first + 1 <= size - 1)
    first = jnp.clip(first, -2, size + 1).astype(jnp.int32)
    return (jnp.where(inside0, first, first + 1), jnp.where(inside1, first + 1, first),
            inside0 | inside1)


def make_plan(ix_BQ, iy_BQ, geometry):
    """Coordinates and per-tile window ranges from pixel coordinates (after padding rules).

    ``ix_BQ``, ``iy_BQ``: (B, T * Ho * Wo) in row-major output order.
    """
    g = geometry
    batch = ix_BQ.shape[0]

    def blocks(values_BQ):
        plane = values_BQ.astype(jnp.float32).reshape(batch, g.out_rows, g.out_cols)
        return to_blocks(plane, g, OUTSIDE)

    ix, iy = blocks(ix_BQ), blocks(iy_BQ)
    per_tile = (batch, g.num_blocks, g.block_pixels)
    x_lo, x_hi, x_any = _tap_span(ix.reshape(per_tile), g.width)
    y_lo, y_hi, y_any = _tap_span(iy.reshape(per_tile), g.height)
    some = x_any & y_any  # the pixel has a tap inside the image
    reads, owned = [], []
    for lo, hi, size, step, limit in ((y_lo, y_hi, g.window_rows, ROW_STEP, g.height),
                                      (x_lo, x_hi, g.window_cols, COL_STEP, g.width)):
        lowest = jnp.where(some, lo, limit).min(2)
        highest = jnp.where(some, hi, -1).max(2)
        any_tap = highest >= 0  # a tile with no tap inside the image reads no window
        lowest = jnp.where(any_tap, lowest, 0)
        first = lowest // step * step
        reads += [first, jnp.where(any_tap, (highest - first) // size + 1, 0)]
        owned += [lowest // size, jnp.where(any_tap, highest // size - lowest // size + 1, 0)]
    return PlanarPlan(xy_B2Q=jnp.stack([ix, iy], 1),
                      reads_4BJ=jnp.stack(reads).astype(jnp.int32),
                      owned_4BJ=jnp.stack(owned).astype(jnp.int32))


# --- in-kernel helpers ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class AxisTaps:
    """One axis's two taps of every pixel, (1, P) float32: first tap, weights, derivatives."""
    first: jax.Array
    weight0: jax.Array
    weight1: jax.Array
    dweight0: jax.Array
    dweight1: jax.Array


def axis_taps(coord_1P, size):
    """Taps at floor(coord) and floor(coord) + 1, weights and derivatives 0 outside [0, size)
    (the reference's weights: x1 - x and x - x0)."""
    first = jnp.floor(coord_1P)
    second = first + 1
    inside0 = (first >= 0) & (first <= size - 1)
    inside1 = (second >= 0) & (second <= size - 1)
    return AxisTaps(first=first,
                    weight0=jnp.where(inside0, second - coord_1P, 0.0),
                    weight1=jnp.where(inside1, coord_1P - first, 0.0),
                    dweight0=jnp.where(inside0, -1.0, 0.0),
                    dweight1=jnp.where(inside1, 1.0, 0.0))


def one_hot_t(taps, weight0, weight1, start, claim_from, length):
    """(length, P) float32: column p holds pixel p's two tap weights at the taps' offsets from
    ``start``; taps before ``claim_from`` (another window's) are left out."""
    shape = (length, taps.first.shape[1])
    offset = jax.lax.broadcasted_iota(jnp.int32, shape, 0).astype(jnp.float32)
    local = taps.first - start.astype(jnp.float32)
    claim = claim_from.astype(jnp.float32)
    weight0 = jnp.where(taps.first >= claim, weight0, 0.0)
    weight1 = jnp.where(taps.first + 1 >= claim, weight1, 0.0)
    return (jnp.where(offset == local, weight0, 0.0)
            + jnp.where(offset == local + 1, weight1, 0.0))


def read_origin(reads_ref, b, j, i, geometry):
    """((top, nominal top), (left, nominal left)) of the ``i``-th window tile ``j`` reads: the
    nominal origin steps by whole windows, the DMA'd one is clamped into the image."""
    g = geometry
    num_cols = jnp.maximum(reads_ref[3, b, j], 1)
    top = reads_ref[0, b, j] + i // num_cols * g.window_rows
    left = reads_ref[2, b, j] + i % num_cols * g.window_cols
    return ((jnp.minimum(top, image_rows(g) - g.window_rows), top),
            (jnp.minimum(left, image_cols(g) - g.window_cols), left))


def load_window(image_hbm, b, top, left, window_vmem, semaphore, geometry):
    """DMAs the (C, rows, cols) window at (``top``, ``left``) of image ``b`` HBM -> VMEM."""
    g = geometry
    copy = pltpu.make_async_copy(
        image_hbm.at[b, :, pl.ds(pl.multiple_of(top, ROW_STEP), g.window_rows),
                     pl.ds(pl.multiple_of(left, COL_STEP), g.window_cols)],
        window_vmem, semaphore)
    copy.start()
    copy.wait()


def rows_times(window_CRW, col_weight_WP):
    """(C, rows, P) float32: every window row times the column matrix."""
    channels, rows, cols = window_CRW.shape
    flat = contract(window_CRW.reshape(channels * rows, cols), col_weight_WP, 1, 0)
    return flat.reshape(channels, rows, col_weight_WP.shape[1])


# --- forward ---------------------------------------------------------------------------------

OUT_ROWS = 8  # forward tiles: 8 output rows x up to 128 columns, written as (C, 8, cols) blocks


def forward_geometry(geometry):
    """The forward's tiles: whole (8, 128) tiles of the (B, C, T * Ho, Wo) output plane (or its
    full width where narrower), so the kernel writes the channel-major output in place and the
    only copy left is the transpose to (B, T * Ho, Wo, C)."""
    cols = min(round_up(geometry.out_cols, 16), LANES)  # 8 x cols: whole 128-lane vregs
    return dataclasses.replace(geometry, block_rows=OUT_ROWS, block_cols=cols)


def _forward_kernel(reads_ref, xy_ref, image_hbm, out_ref, window_vmem, semaphore, acc_vmem,
                    *, geometry):
    g = geometry
    b, j = pl.program_id(0), pl.program_id(1)
    acc_vmem[...] = jnp.zeros_like(acc_vmem)

    def add_window(i, carry):
        (top, top_claim), (left, left_claim) = read_origin(reads_ref, b, j, i, g)
        load_window(image_hbm, b, top, left, window_vmem, semaphore, g)
        window_CRW = window_vmem[...]
        for k in range(g.block_rows):  # one output row of the tile at a time: P = its columns
            pixels = slice(k * g.block_cols, (k + 1) * g.block_cols)
            xs = axis_taps(xy_ref[0, 0:1, pixels], g.width)
            ys = axis_taps(xy_ref[0, 1:2, pixels], g.height)
            col_weight_WP = one_hot_t(xs, xs.weight0, xs.weight1, left, left_claim,
                                      g.window_cols)
            row_weight_RP = one_hot_t(ys, ys.weight0, ys.weight1, top, top_claim,
                                      g.window_rows)
            sampled_CRP = rows_times(window_CRW, col_weight_WP)
            acc_vmem[:, k, :] += jnp.sum(row_weight_RP[None] * sampled_CRP, axis=1)
        return carry

    num_windows = reads_ref[1, b, j] * reads_ref[3, b, j]
    jax.lax.fori_loop(0, num_windows, add_window, 0)
    out_ref[0] = acc_vmem[...].astype(out_ref.dtype)


def _tile_origin(j, geometry):
    """Block index (row, col) of tile ``j`` in a (B, C, T * Ho, Wo) plane."""
    tile_cols = geometry.block_grid[1]
    return j // tile_cols, j % tile_cols


def cotangent_layout(cotangent_BQC, geometry):
    """(B, T * Ho * Wo, C) -> (B, C, rows, cols) padded to whole forward tiles."""
    g = geometry
    tile_rows, tile_cols = g.block_grid
    plane = cotangent_BQC.reshape(cotangent_BQC.shape[0], g.out_rows, g.out_cols, g.channels)
    plane = jnp.pad(plane, ((0, 0), (0, tile_rows * g.block_rows - g.out_rows),
                            (0, tile_cols * g.block_cols - g.out_cols), (0, 0)))
    return plane.transpose(0, 3, 1, 2)


def _coordinate_spec(geometry):
    return pl.BlockSpec((1, 2, geometry.block_pixels), lambda b, j, *_: (b, 0, j))


def _image_window_scratch(geometry, dtype):
    g = geometry
    return [pltpu.VMEM((g.channels, g.window_rows, g.window_cols), dtype),
            pltpu.SemaphoreType.DMA(())]


def forward(image_BCHW, plan, geometry, interpret):
    """(B, C, T * Ho, Wo) samples (``image_BCHW`` from ``planar_image``; ``plan`` and
    ``geometry`` from ``forward_geometry``), rows and columns padded to whole tiles."""
    g = geometry
    batch = image_BCHW.shape[0]
    tile_rows, tile_cols = g.block_grid
    make_call = lambda interpret_flag: pl.pallas_call(
        functools.partial(_forward_kernel, geometry=g),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(batch, g.num_blocks),
            in_specs=[_coordinate_spec(g), pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=pl.BlockSpec((1, g.channels, g.block_rows, g.block_cols),
                                   lambda b, j, *_: (b, 0) + _tile_origin(j, g)),
            scratch_shapes=_image_window_scratch(g, image_BCHW.dtype) + [
                pltpu.VMEM((g.channels, g.block_rows, g.block_cols), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(
            (batch, g.channels, tile_rows * g.block_rows, tile_cols * g.block_cols),
            image_BCHW.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=interpret_params(interpret_flag))
    return kernel_or_interpreter(make_call, (PLATFORM,), interpret, plan.reads_4BJ,
                                 plan.xy_B2Q, image_BCHW)


# --- d_image ----------------------------------------------------------------------------------

def _touches(owned_ref, b, window, j, geometry):
    """Whether tile ``j`` of image ``b`` has taps in aligned window ``window``."""
    window_row, window_col = window // geometry.window_grid[1], window % geometry.window_grid[1]
    first_row, first_col = owned_ref[0, b, j], owned_ref[2, b, j]
    return ((window_row >= first_row) & (window_row < first_row + owned_ref[1, b, j])
            & (window_col >= first_col) & (window_col < first_col + owned_ref[3, b, j]))


def _d_image_kernel(owned_ref, xy_ref, cotangent_ref, out_ref, *, geometry):
    g = geometry
    b, window, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)

    @pl.when(j == 0)
    def _():
        out_ref[...] = jnp.zeros_like(out_ref)

    @pl.when(_touches(owned_ref, b, window, j, g))
    def _():
        top = window // g.window_grid[1] * g.window_rows
        left = window % g.window_grid[1] * g.window_cols
        d_window = jnp.zeros((g.channels * g.window_rows, g.window_cols), jnp.float32)
        for k in range(g.block_rows):  # one output row of the tile at a time
            pixels = slice(k * g.block_cols, (k + 1) * g.block_cols)
            xs = axis_taps(xy_ref[0, 0:1, pixels], g.width)
            ys = axis_taps(xy_ref[0, 1:2, pixels], g.height)
            col_weight_WP = one_hot_t(xs, xs.weight0, xs.weight1, left, left, g.window_cols)
            row_weight_RP = one_hot_t(ys, ys.weight0, ys.weight1, top, top, g.window_rows)
            cotangent_CP = cotangent_ref[0, :, k, :].astype(jnp.float32)
            scaled_CRP = row_weight_RP[None] * cotangent_CP[:, None, :]
            d_window += contract(scaled_CRP.reshape(g.channels * g.window_rows, -1),
                                 col_weight_WP, 1, 1)
        out_ref[0] += d_window.reshape(g.channels, g.window_rows, g.window_cols)


def d_image(cotangent_BCRW, plan, geometry, interpret):
    """(B, C, window grid rows, window grid cols) float32: the forward's transpose applied to
    the cotangent (``cotangent_layout``), one aligned window per output block."""
    g = geometry
    batch = cotangent_BCRW.shape[0]

    def tile_if_touching(b, window, j, owned_ref):
        # Tiles that miss the window map to tile 0: the pipeline fetches a block only when its
        # index changes, so a window reads about the tiles it needs, not all of the cotangent.
        return jnp.where(_touches(owned_ref, b, window, j, g), j, 0)

    def window_block(b, window, j, *_):
        return b, 0, window // g.window_grid[1], window % g.window_grid[1]

    rows, cols = g.window_grid
    make_call = lambda interpret_flag: pl.pallas_call(
        functools.partial(_d_image_kernel, geometry=g),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(batch, g.num_windows, g.num_blocks),
            in_specs=[
                pl.BlockSpec((1, 2, g.block_pixels), lambda b, w, j, owned: (
                    b, 0, tile_if_touching(b, w, j, owned))),
                pl.BlockSpec((1, g.channels, g.block_rows, g.block_cols),
                             lambda b, w, j, owned: (b, 0) + _tile_origin(
                                 tile_if_touching(b, w, j, owned), g))],
            out_specs=pl.BlockSpec((1, g.channels, g.window_rows, g.window_cols), window_block),
        ),
        out_shape=jax.ShapeDtypeStruct(
            (batch, g.channels, rows * g.window_rows, cols * g.window_cols), jnp.float32),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret_params(interpret_flag))
    return kernel_or_interpreter(make_call, (PLATFORM,), interpret, plan.owned_4BJ,
                                 plan.xy_B2Q, cotangent_BCRW)


# --- d (pixel coordinates) --------------------------------------------------------------------

def _d_coordinates_kernel(reads_ref, xy_ref, cotangent_ref, image_hbm, d_xy_ref, window_vmem,
                          semaphore, *, geometry):
    g = geometry
    b, j = pl.program_id(0), pl.program_id(1)

    def add_window(i, acc_2P):
        (top, top_claim), (left, left_claim) = read_origin(reads_ref, b, j, i, g)
        load_window(image_hbm, b, top, left, window_vmem, semaphore, g)
        window_CRW = window_vmem[...]
        rows = []
        for k in range(g.block_rows):  # one output row of the tile at a time
            pixels = slice(k * g.block_cols, (k + 1) * g.block_cols)
            xs = axis_taps(xy_ref[0, 0:1, pixels], g.width)
            ys = axis_taps(xy_ref[0, 1:2, pixels], g.height)
            col_weight_WP = one_hot_t(xs, xs.weight0, xs.weight1, left, left_claim,
                                      g.window_cols)
            dcol_weight_WP = one_hot_t(xs, xs.dweight0, xs.dweight1, left, left_claim,
                                       g.window_cols)
            row_weight_RP = one_hot_t(ys, ys.weight0, ys.weight1, top, top_claim,
                                      g.window_rows)
            drow_weight_RP = one_hot_t(ys, ys.dweight0, ys.dweight1, top, top_claim,
                                       g.window_rows)
            cotangent_C1P = cotangent_ref[0, :, k, :].astype(jnp.float32)[:, None, :]
            d_x_CRP = row_weight_RP[None] * rows_times(window_CRW, dcol_weight_WP)
            d_y_CRP = drow_weight_RP[None] * rows_times(window_CRW, col_weight_WP)
            rows.append(jnp.concatenate([
                jnp.sum(jnp.sum(d_CRP * cotangent_C1P, axis=1), axis=0, keepdims=True)
                for d_CRP in (d_x_CRP, d_y_CRP)], axis=0))
        return acc_2P + jnp.concatenate(rows, axis=1)

    num_windows = reads_ref[1, b, j] * reads_ref[3, b, j]
    d_xy_ref[0] = jax.lax.fori_loop(0, num_windows, add_window,
                                    jnp.zeros(d_xy_ref.shape[1:], jnp.float32))


def d_coordinates(image_BCHW, cotangent_BCRW, plan, geometry, interpret):
    """(B, 2, padded pixels) float32, tile-major: the gradient in pixel coordinates (x, y)."""
    g = geometry
    batch = image_BCHW.shape[0]
    make_call = lambda interpret_flag: pl.pallas_call(
        functools.partial(_d_coordinates_kernel, geometry=g),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(batch, g.num_blocks),
            in_specs=[_coordinate_spec(g),
                      pl.BlockSpec((1, g.channels, g.block_rows, g.block_cols),
                                   lambda b, j, *_: (b, 0) + _tile_origin(j, g)),
                      pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=_coordinate_spec(g),
            scratch_shapes=_image_window_scratch(g, image_BCHW.dtype),
        ),
        out_shape=jax.ShapeDtypeStruct((batch, 2, g.padded_pixels), jnp.float32),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=interpret_params(interpret_flag))
    return kernel_or_interpreter(make_call, (PLATFORM,), interpret, plan.reads_4BJ,
                                 plan.xy_B2Q, cotangent_BCRW, image_BCHW)
