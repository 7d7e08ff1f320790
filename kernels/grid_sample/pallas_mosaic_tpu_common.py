"""What the TPU warp kernels share: geometry, tile order, and the pixel-major path's pre-pass.

Mosaic TPU cannot gather rows of a VMEM ref by a vector of indices, so the kernels never
gather. Outputs are cut into 2-D tiles (``block_rows x block_cols`` pixels of one image's
T * Ho x Wo output plane, P pixels in all) and the source is read through 2-D *windows*.
Two paths, by channel count (``Geometry.planar``):

- C >= 128, pixel-major (this module, ``pallas_mosaic_tpu``, ``pallas_mosaic_tpu_vjp``): the
  image is a flat (B, pixels, C) array (C on the lanes, nothing padded) and a window
  (``window_rows x window_cols`` pixels) is DMA'd HBM -> VMEM one image row segment at a time
  into a flat (window pixels, C) buffer. Within one window, bilinear sampling is a matmul with
  a one-hot interpolation matrix M (P x window pixels, at most 4 non-zeros per row). The
  pre-pass (plain XLA, ``make_plan``) gives per-pixel taps as lane-dense (B, 4, pixels) arrays
  (a (B, pixels, 4) one would be padded to 128 lanes in HBM, 32x), so kernels build M^T
  (window pixels x P), and per tile the rows and columns its taps span: the forward (and
  d_grid) windows start at that span's top row and at the 16-aligned column at or left of its
  first column (Mosaic DMAs start on whole tiles) and step by whole windows until they cover
  it (one window for smooth flows, all of the image for random ones). d_image owns an aligned
  grid of windows instead, and the pre-pass also gives the range of those a tile touches.
- C < 128, planar (``pallas_mosaic_tpu_planar``): C on the lanes would be padded 128 / C times
  in HBM, so the image is (B, C, rows, cols), the output and cotangent (B, C, T * Ho, Wo), and
  bilinear weights are applied separably (a column and a row matrix per window); see there.
"""

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

NUM_TAPS = 4
LANES = 128
WINDOW_COL_STEP = 16  # window columns: whole (16, 128) bfloat16 tiles per image row segment
PLANAR_ROW_STEP = 16  # planar window rows (C < 128): whole (16, 128) bfloat16 tiles
PLANAR_WINDOW_BYTES = 2**20  # planar windows wider than 128 columns stay under this (float32)


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
    def planar(self):
        """Whether the call takes the planar path (``pallas_mosaic_tpu_planar``): below 128
        channels, C on the lanes would be padded to 128 lanes in HBM."""
        return self.channels < LANES

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

    @property
    def read_width(self):
        """Width of the image the forward reads, a multiple of WINDOW_COL_STEP: windows start
        on columns that are multiples of it, so every row-segment DMA starts on a whole
        (sublane) tile of the flat (pixels, C) image, as Mosaic requires."""
        return -(-self.width // WINDOW_COL_STEP) * WINDOW_COL_STEP + self.window_cols

    @property
    def read_source_pixels(self):
        return (self.height + self.window_rows) * self.read_width


def _round_up(value, step):
    return -(-value // step) * step


def make_geometry(height, width, channels, out_rows, out_cols, config):
    """The call's tiles from a ``MosaicTpuConfig``, windows shrunk to the image where smaller."""
    if (config.block_rows * config.block_cols) % LANES:
        raise ValueError(f"MosaicTpuConfig: block_rows * block_cols must be a multiple of "
                         f"{LANES}; got {config.block_rows} x {config.block_cols}.")
    if config.window_cols % WINDOW_COL_STEP:
        raise ValueError(f"MosaicTpuConfig.window_cols must be a multiple of "
                         f"{WINDOW_COL_STEP}; got {config.window_cols}.")
    if config.planar_window_rows % PLANAR_ROW_STEP or config.planar_window_cols % LANES:
        raise ValueError(f"MosaicTpuConfig: planar_window_rows must be a multiple of "
                         f"{PLANAR_ROW_STEP} and planar_window_cols of {LANES}; got "
                         f"{config.planar_window_rows} x {config.planar_window_cols}.")
    if channels < LANES:  # planar windows (pallas_mosaic_tpu_planar), clamped to the image
        window_rows = min(config.planar_window_rows, _round_up(height, PLANAR_ROW_STEP))
        window_cols = min(config.planar_window_cols, _round_up(width, LANES))
        while channels * window_rows * window_cols * 4 > PLANAR_WINDOW_BYTES and window_cols > LANES:
            window_cols = _round_up(window_cols // 2, LANES)  # many channels: narrower windows
    else:
        window_rows = min(config.window_rows, height)
        window_cols = min(config.window_cols, _round_up(width, WINDOW_COL_STEP))
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
    """The pre-pass's arrays for one call, pixels in tile-major order (``to_blocks``) on the
    last (lane) axis."""
    row_B4Q: jax.Array          # source row of each tap (clamped; weight 0 if outside)
    col_B4Q: jax.Array          # source column of each tap
    weight_B4Q: jax.Array       # bilinear tap weights, float32, 0 outside the image
    dweight_dx_B4Q: jax.Array   # d weight / d x (pixel units), 0 outside
    dweight_dy_B4Q: jax.Array   # d weight / d y
    reads_4BJ: jax.Array        # int32 per tile: top row of its windows, how many down, left
                                # column, how many across (windows start at its taps' corner)
    owned_4BJ: jax.Array        # the same in d_image's aligned window grid: first window row,
                                # count, first window column, count


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
    # (B, 4, Q) throughout: a (B, Q, 4) intermediate would be padded to 128 lanes in HBM.
    row_B4Q, col_B4Q, inside_B4Q = (jnp.stack(v, 1) for v in (rows, cols, inside))

    per_tile = (batch, NUM_TAPS, g.num_blocks, g.block_pixels)
    reads, owned = [], []
    for taps_B4Q, size, limit, step in ((row_B4Q, g.window_rows, g.height, 1),
                                        (col_B4Q, g.window_cols, g.width, WINDOW_COL_STEP)):
        lowest = jnp.where(inside_B4Q, taps_B4Q, limit).reshape(per_tile).min((1, 3))
        highest = jnp.where(inside_B4Q, taps_B4Q, -1).reshape(per_tile).max((1, 3))
        any_tap = highest >= 0  # a tile with no tap inside the image reads no window
        lowest = jnp.where(any_tap, lowest, 0)
        first = lowest // step * step  # read windows start on DMA-aligned columns
        reads += [first, jnp.where(any_tap, (highest - first) // size + 1, 0)]
        owned += [lowest // size, jnp.where(any_tap, highest // size - lowest // size + 1, 0)]
    return Plan(row_B4Q=row_B4Q, col_B4Q=col_B4Q,
                weight_B4Q=jnp.stack(weight, 1), dweight_dx_B4Q=jnp.stack(d_dx, 1),
                dweight_dy_B4Q=jnp.stack(d_dy, 1), reads_4BJ=jnp.stack(reads).astype(jnp.int32),
                owned_4BJ=jnp.stack(owned).astype(jnp.int32))


def flat_read_image(image_BHWC, geometry):
    """(B, (H + window rows) * read width, C): zeros below and right of the image, so a
    window starting at any pixel row and aligned column stays inside."""
    g = geometry
    batch, height, width, channels = image_BHWC.shape
    padded = jnp.pad(image_BHWC, ((0, 0), (0, g.window_rows), (0, g.read_width - width),
                                  (0, 0)))
    return padded.reshape(batch, g.read_source_pixels, channels)


def window_origin(reads_ref, b, j, i, geometry):
    """(top row, left column) of the ``i``-th window tile ``j`` of image ``b`` reads."""
    num_cols = jnp.maximum(reads_ref[3, b, j], 1)
    return (reads_ref[0, b, j] + i // num_cols * geometry.window_rows,
            reads_ref[2, b, j] + i % num_cols * geometry.window_cols)


def num_windows_of(reads_ref, b, j):
    return reads_ref[1, b, j] * reads_ref[3, b, j]


def load_window(image_hbm, b, top, left, window_vmem, semaphore, geometry):
    """DMAs the window at (``top``, ``left``) of image ``b`` (``flat_read_image``) HBM -> VMEM,
    one copy per image row segment; waits.

    All row copies are started before the first wait, so they overlap one another.
    """
    g = geometry

    def row_copy(r):
        # read_width and left are multiples of WINDOW_COL_STEP (make_plan): tell Mosaic.
        start = pl.multiple_of((top + r) * g.read_width + left, WINDOW_COL_STEP)
        return pltpu.make_async_copy(
            image_hbm.at[b, pl.ds(start, g.window_cols)],
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


def _local_index(row, col, top, left, geometry):
    """Index of taps (row, col) inside the window at (top, left), -1 where outside it."""
    g = geometry
    r = row - top
    c = col - left
    inside = (r >= 0) & (r < g.window_rows) & (c >= 0) & (c < g.window_cols)
    return jnp.where(inside, r * g.window_cols + c, -1)


def interpolation_matrix_t(row_4P, col_4P, weight_4P, top, left, geometry):
    """(window pixels, P) float32, M^T: column p holds the weights of pixel p's taps in the
    window at (``top``, ``left``), from (4, P) taps."""
    shape = (geometry.window_pixels, row_4P.shape[1])
    row = jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    matrix = jnp.zeros(shape, jnp.float32)
    for t in range(NUM_TAPS):
        local = _local_index(row_4P[t:t + 1, :], col_4P[t:t + 1, :], top, left, geometry)
        matrix += jnp.where(row == local, weight_4P[t:t + 1, :], 0.0)
    return matrix


def contract(a, b, a_dim, b_dim):
    """float32 MXU product of ``a`` and ``b`` over ``a_dim`` and ``b_dim`` (transposed operands
    need no transpose)."""
    return jax.lax.dot_general(a.astype(jnp.float32), b.astype(jnp.float32),
                               (((a_dim,), (b_dim,)), ((), ())),
                               preferred_element_type=jnp.float32)


def pixel_values_spec(geometry, index_map):
    """BlockSpec of one tile of tile-major (B, pixels, C) values, a (1, P, C) block;
    ``index_map`` gives (b, tile)."""
    g = geometry
    return pl.BlockSpec((1, g.block_pixels, g.channels),
                        lambda *i: (index_map(*i)[0], index_map(*i)[1], 0))


def interpret_params(interpret):
    """What ``pallas_call(interpret=...)`` wants: TPU interpret mode (DMAs, semaphores) or off."""
    return pltpu.InterpretParams() if interpret else False
