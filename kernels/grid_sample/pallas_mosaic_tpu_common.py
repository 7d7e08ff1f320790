"""What the TPU warp kernels share: the XLA pre-pass (taps, tiles, windows) and in-kernel helpers.

Mosaic TPU cannot gather rows of a VMEM ref by a vector of indices, so the kernels never
gather. Outputs are cut into 2-D tiles (``block_rows x block_cols`` pixels of one image's
T * Ho x Wo output plane, P pixels in all), and the source into 2-D *windows*
(``window_rows x window_cols`` pixels), DMA'd HBM -> VMEM one image row segment at a time
into a flat (window pixels, C) buffer. Within one window, bilinear sampling is a matmul with a
one-hot interpolation matrix M (P x window pixels, at most 4 non-zeros per row: the tap
weights). The pre-pass (plain XLA) finds, for every output tile, the range of window rows and
window columns its taps touch; the kernels loop over exactly those, so any flow is handled (a
smooth flow needs one to four windows per tile, a random one needs all).

2-D tiles and windows keep a smooth flow's footprint compact: flat runs of output pixels
against bands of whole source rows needed ten windows per block on 256 x 256 maps.
"""

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

NUM_TAPS = 4
LANES = 128
WINDOW_COL_STEP = 16  # window columns: whole (16, 128) bfloat16 tiles per image row segment


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Static tiling of one call (all sizes per image; windows clamped to the image)."""
    height: int
    width: int
    channels: int
    out_rows: int        # T * Ho: the T output planes of one image, stacked
    out_cols: int        # Wo
    block_rows: int
    block_cols: int
    window_rows: int
    window_cols: int

    @property
    def block_pixels(self):
        return self.block_rows * self.block_cols

    @property
    def num_pixels(self):
        return self.out_rows * self.out_cols

    @property
    def block_grid(self):
        return -(-self.out_rows // self.block_rows), -(-self.out_cols // self.block_cols)

    @property
    def num_blocks(self):
        return self.block_grid[0] * self.block_grid[1]

    @property
    def padded_pixels(self):
        return self.num_blocks * self.block_pixels

    @property
    def window_grid(self):
        return -(-self.height // self.window_rows), -(-self.width // self.window_cols)

    @property
    def num_windows(self):
        return self.window_grid[0] * self.window_grid[1]

    @property
    def window_pixels(self):
        return self.window_rows * self.window_cols

    @property
    def padded_width(self):
        return self.window_grid[1] * self.window_cols

    @property
    def padded_source_pixels(self):
        return self.window_grid[0] * self.window_rows * self.padded_width


def make_geometry(height, width, channels, out_rows, out_cols, config):
    """The call's tiles from a ``MosaicTpuConfig``, windows shrunk to the image where smaller."""
    if (config.block_rows * config.block_cols) % LANES:
        raise ValueError(f"MosaicTpuConfig: block_rows * block_cols must be a multiple of "
                         f"{LANES}; got {config.block_rows} x {config.block_cols}.")
    if config.window_cols % WINDOW_COL_STEP:
        raise ValueError(f"MosaicTpuConfig.window_cols must be a multiple of "
                         f"{WINDOW_COL_STEP}; got {config.window_cols}.")
    window_rows = min(config.window_rows, height)
    window_cols = min(config.window_cols, -(-width // WINDOW_COL_STEP) * WINDOW_COL_STEP)
    return Geometry(height, width, channels, out_rows, out_cols, config.block_rows,
                    config.block_cols, window_rows, window_cols)


def to_blocks(plane_BRC_, geometry, fill=0):
    """(B, out_rows, out_cols, ...) -> (B, padded pixels, ...) in tile-major order."""
    g = geometry
    rows, cols = g.block_grid
    batch, tail = plane_BRC_.shape[0], plane_BRC_.shape[3:]
    pad = [(0, 0), (0, rows * g.block_rows - g.out_rows), (0, cols * g.block_cols - g.out_cols)]
    plane = jnp.pad(plane_BRC_, pad + [(0, 0)] * len(tail), constant_values=fill)
    plane = plane.reshape((batch, rows, g.block_rows, cols, g.block_cols) + tail)
    plane = jnp.swapaxes(plane, 2, 3)
    return plane.reshape((batch, g.padded_pixels) + tail)


def from_blocks(blocks_BQ_, geometry):
    """Inverse of ``to_blocks``: (B, padded pixels, ...) -> (B, out_rows, out_cols, ...)."""
    g = geometry
    rows, cols = g.block_grid
    batch, tail = blocks_BQ_.shape[0], blocks_BQ_.shape[2:]
    plane = blocks_BQ_.reshape((batch, rows, cols, g.block_rows, g.block_cols) + tail)
    plane = jnp.swapaxes(plane, 2, 3)
    plane = plane.reshape((batch, rows * g.block_rows, cols * g.block_cols) + tail)
    return plane[:, :g.out_rows, :g.out_cols]


@dataclasses.dataclass(frozen=True)
class Plan:
    """The pre-pass's arrays for one call, pixels in tile-major order (``to_blocks``)."""
    row_BQ4: jax.Array          # source row of each tap (clamped; weight 0 if outside)
    col_BQ4: jax.Array          # source column of each tap
    weight_BQ4: jax.Array       # bilinear tap weights, float32, 0 outside the image
    dweight_dx_BQ4: jax.Array   # d weight / d x (pixel units), 0 outside
    dweight_dy_BQ4: jax.Array   # d weight / d y
    windows_4BJ: jax.Array      # int32 per tile: first window row, count, first column, count


def make_plan(ix_BQ, iy_BQ, geometry):
    """Taps, weights and per-tile window ranges from pixel coordinates (after padding rules).

    ``ix_BQ``, ``iy_BQ``: (B, T * Ho * Wo) in row-major output order.
    """
    g = geometry
    batch = ix_BQ.shape[0]

    def blocks(values_BQ, fill):
        return to_blocks(values_BQ.reshape(batch, g.out_rows, g.out_cols), g, fill)

    real = blocks(jnp.ones(ix_BQ.shape, bool), False)
    ix, iy = blocks(ix_BQ.astype(jnp.float32), 0.0), blocks(iy_BQ.astype(jnp.float32), 0.0)
    x0, y0 = jnp.floor(ix), jnp.floor(iy)
    x1, y1 = x0 + 1, y0 + 1
    # (x, y, weight, d weight/dx, d weight/dy), PyTorch's tap order and weights (see reference).
    taps = (
        (x0, y0, (x1 - ix) * (y1 - iy), -(y1 - iy), -(x1 - ix)),
        (x1, y0, (ix - x0) * (y1 - iy), y1 - iy, -(ix - x0)),
        (x0, y1, (x1 - ix) * (iy - y0), -(iy - y0), x1 - ix),
        (x1, y1, (ix - x0) * (iy - y0), iy - y0, ix - x0),
    )
    rows, cols, weight, d_dx, d_dy, inside = [], [], [], [], [], []
    for tap_x, tap_y, w, w_dx, w_dy in taps:
        ok = real & (tap_x >= 0) & (tap_x <= g.width - 1) & (tap_y >= 0) & (tap_y <= g.height - 1)
        cols.append(jnp.clip(tap_x, 0, g.width - 1).astype(jnp.int32))
        rows.append(jnp.clip(tap_y, 0, g.height - 1).astype(jnp.int32))
        weight.append(jnp.where(ok, w, 0.0))
        d_dx.append(jnp.where(ok, w_dx, 0.0))
        d_dy.append(jnp.where(ok, w_dy, 0.0))
        inside.append(ok)
    row_BQ4, col_BQ4, inside_BQ4 = jnp.stack(rows, -1), jnp.stack(cols, -1), jnp.stack(inside, -1)

    per_tile = (batch, g.num_blocks, g.block_pixels * NUM_TAPS)
    ranges = []
    for taps_BQ4, size, count in ((row_BQ4, g.window_rows, g.window_grid[0]),
                                  (col_BQ4, g.window_cols, g.window_grid[1])):
        window_BQ4 = taps_BQ4 // size
        lowest = jnp.where(inside_BQ4, window_BQ4, count).reshape(per_tile).min(-1)
        highest = jnp.where(inside_BQ4, window_BQ4, -1).reshape(per_tile).max(-1)
        any_tap = highest >= 0  # a tile with no tap inside the image reads no window
        ranges += [jnp.where(any_tap, lowest, 0), jnp.where(any_tap, highest - lowest + 1, 0)]
    return Plan(row_BQ4=row_BQ4, col_BQ4=col_BQ4, weight_BQ4=jnp.stack(weight, -1),
                dweight_dx_BQ4=jnp.stack(d_dx, -1), dweight_dy_BQ4=jnp.stack(d_dy, -1),
                windows_4BJ=jnp.stack(ranges).astype(jnp.int32))


def flat_padded_image(image_BHWC, geometry):
    """(B, padded rows * padded width, C): zero rows and columns fill the last windows."""
    g = geometry
    batch, height, width, channels = image_BHWC.shape
    rows = g.window_grid[0] * g.window_rows
    padded = jnp.pad(image_BHWC, ((0, 0), (0, rows - height), (0, g.padded_width - width), (0, 0)))
    return padded.reshape(batch, g.padded_source_pixels, channels)


def window_of(windows_ref, b, j, i):
    """(window row, window column) of the ``i``-th window tile ``j`` of image ``b`` reads."""
    num_cols = jnp.maximum(windows_ref[3, b, j], 1)
    return windows_ref[0, b, j] + i // num_cols, windows_ref[2, b, j] + i % num_cols


def num_windows_of(windows_ref, b, j):
    return windows_ref[1, b, j] * windows_ref[3, b, j]


def load_window(image_hbm, b, window_row, window_col, window_vmem, semaphore, geometry):
    """DMAs one window of image ``b`` HBM -> VMEM (one copy per image row segment); waits.

    All row copies are started before the first wait, so they overlap one another.
    """
    g = geometry

    def row_copy(r):
        start = (window_row * g.window_rows + r) * g.padded_width + window_col * g.window_cols
        return pltpu.make_async_copy(
            image_hbm.at[b, pl.ds(pl.multiple_of(start, WINDOW_COL_STEP), g.window_cols)],
            window_vmem.at[pl.ds(pl.multiple_of(r * g.window_cols, WINDOW_COL_STEP),
                                 g.window_cols)],
            semaphore)

    def start(r, carry):
        row_copy(r).start()
        return carry

    def wait(r, carry):
        row_copy(r).wait()
        return carry

    jax.lax.fori_loop(0, g.window_rows, start, 0)
    jax.lax.fori_loop(0, g.window_rows, wait, 0)


def _local_index(row, col, window_row, window_col, geometry):
    """Index of taps (row, col) inside the window, -1 where they fall outside it."""
    g = geometry
    r = row - window_row * g.window_rows
    c = col - window_col * g.window_cols
    inside = (r >= 0) & (r < g.window_rows) & (c >= 0) & (c < g.window_cols)
    return jnp.where(inside, r * g.window_cols + c, -1)


def interpolation_matrix(row_P4, col_P4, weight_P4, window_row, window_col, geometry):
    """(P, window pixels) float32: row p holds the weights of pixel p's taps in the window."""
    shape = (row_P4.shape[0], geometry.window_pixels)
    column = jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    matrix = jnp.zeros(shape, jnp.float32)
    for t in range(NUM_TAPS):
        local = _local_index(row_P4[:, t:t + 1], col_P4[:, t:t + 1], window_row, window_col,
                             geometry)
        matrix += jnp.where(column == local, weight_P4[:, t:t + 1], 0.0)
    return matrix


def interpolation_matrix_t(row_4P, col_4P, weight_4P, window_row, window_col, geometry):
    """(window pixels, P) float32: ``interpolation_matrix`` transposed, from (4, P) taps."""
    shape = (geometry.window_pixels, row_4P.shape[1])
    row = jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    matrix = jnp.zeros(shape, jnp.float32)
    for t in range(NUM_TAPS):
        local = _local_index(row_4P[t:t + 1, :], col_4P[t:t + 1, :], window_row, window_col,
                             geometry)
        matrix += jnp.where(row == local, weight_4P[t:t + 1, :], 0.0)
    return matrix


def interpret_params(interpret):
    """What ``pallas_call(interpret=...)`` wants: TPU interpret mode (DMAs, semaphores) or off."""
    return pltpu.InterpretParams() if interpret else False
