"""What the TPU warp kernels share: the XLA pre-pass (taps, tiles, windows) and in-kernel helpers.

Mosaic TPU cannot gather rows of a VMEM ref by a vector of indices, so the kernels never
gather. An output block of P pixels reads its source through *windows*: bands of whole image
rows, DMA'd HBM -> VMEM. Within one window, bilinear sampling is a matmul with a one-hot
interpolation matrix M (P x window pixels, at most 4 non-zeros per row: the tap weights).
The pre-pass (plain XLA) finds, for every output block, the first window its taps touch and
how many consecutive windows cover them all; the kernels loop over exactly those, so any flow
is handled (a smooth flow needs one or two windows per block, a random one needs all).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

NUM_TAPS = 4
SUBLANES = 8
LANES = 128


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Static tiling of one call: P output pixels per block, windows of R whole rows."""
    height: int
    width: int
    channels: int
    num_pixels: int      # Q = T * Ho * Wo output pixels per image
    block_pixels: int    # P
    window_rows: int     # R

    @property
    def num_blocks(self):
        return -(-self.num_pixels // self.block_pixels)

    @property
    def padded_pixels(self):
        return self.num_blocks * self.block_pixels

    @property
    def window_pixels(self):
        return self.window_rows * self.width

    @property
    def num_windows(self):
        return -(-self.height // self.window_rows)

    @property
    def padded_source_pixels(self):
        return self.num_windows * self.window_pixels


def make_geometry(height, width, channels, num_pixels, config):
    """Blocks of ``config.block_pixels`` outputs; windows of whole rows, a multiple of 8 pixels."""
    if config.block_pixels % LANES:
        raise ValueError(f"MosaicTpuConfig.block_pixels must be a multiple of {LANES}; "
                         f"got {config.block_pixels}.")
    row_step = SUBLANES // math.gcd(width, SUBLANES)  # rows per 8-aligned window
    rows = max(1, config.window_pixels // width)
    rows = min(rows, height)
    rows = -(-rows // row_step) * row_step
    return Geometry(height, width, channels, num_pixels, config.block_pixels, rows)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The pre-pass's arrays for one call (B images, Q padded to whole blocks)."""
    index_BQ4: jax.Array        # flat source pixel of each tap (clamped; weight 0 if outside)
    weight_BQ4: jax.Array       # bilinear tap weights, float32, 0 outside the image
    dweight_dx_BQ4: jax.Array   # d weight / d x (pixel units), 0 outside
    dweight_dy_BQ4: jax.Array   # d weight / d y
    first_window_BJ: jax.Array  # int32: first window a block's taps touch
    num_windows_BJ: jax.Array   # int32: consecutive windows covering them (0: no taps inside)


def make_plan(ix_BQ, iy_BQ, geometry):
    """Taps, weights and per-block window ranges from pixel coordinates (after padding rules)."""
    g = geometry
    pad = g.padded_pixels - g.num_pixels
    real_BQ = jnp.pad(jnp.ones(ix_BQ.shape, bool), ((0, 0), (0, pad)))
    ix_BQ = jnp.pad(ix_BQ.astype(jnp.float32), ((0, 0), (0, pad)))
    iy_BQ = jnp.pad(iy_BQ.astype(jnp.float32), ((0, 0), (0, pad)))
    x0, y0 = jnp.floor(ix_BQ), jnp.floor(iy_BQ)
    x1, y1 = x0 + 1, y0 + 1
    # (x, y, weight, d weight/dx, d weight/dy), PyTorch's tap order and weights (see reference).
    taps = (
        (x0, y0, (x1 - ix_BQ) * (y1 - iy_BQ), -(y1 - iy_BQ), -(x1 - ix_BQ)),
        (x1, y0, (ix_BQ - x0) * (y1 - iy_BQ), y1 - iy_BQ, -(ix_BQ - x0)),
        (x0, y1, (x1 - ix_BQ) * (iy_BQ - y0), -(iy_BQ - y0), x1 - ix_BQ),
        (x1, y1, (ix_BQ - x0) * (iy_BQ - y0), iy_BQ - y0, ix_BQ - x0),
    )
    index, weight, d_dx, d_dy, inside = [], [], [], [], []
    for tap_x, tap_y, w, w_dx, w_dy in taps:
        ok = (real_BQ & (tap_x >= 0) & (tap_x <= g.width - 1)
              & (tap_y >= 0) & (tap_y <= g.height - 1))
        col = jnp.clip(tap_x, 0, g.width - 1).astype(jnp.int32)
        row = jnp.clip(tap_y, 0, g.height - 1).astype(jnp.int32)
        index.append(row * g.width + col)
        weight.append(jnp.where(ok, w, 0.0))
        d_dx.append(jnp.where(ok, w_dx, 0.0))
        d_dy.append(jnp.where(ok, w_dy, 0.0))
        inside.append(ok)
    index_BQ4 = jnp.stack(index, -1)
    inside_BQ4 = jnp.stack(inside, -1)

    batch = ix_BQ.shape[0]
    window_BQ4 = index_BQ4 // g.window_pixels
    blocks = (batch, g.num_blocks, g.block_pixels * NUM_TAPS)
    lowest_BJ = jnp.where(inside_BQ4, window_BQ4, g.num_windows).reshape(blocks).min(-1)
    highest_BJ = jnp.where(inside_BQ4, window_BQ4, -1).reshape(blocks).max(-1)
    any_BJ = highest_BJ >= 0
    return Plan(
        index_BQ4=index_BQ4,
        weight_BQ4=jnp.stack(weight, -1),
        dweight_dx_BQ4=jnp.stack(d_dx, -1),
        dweight_dy_BQ4=jnp.stack(d_dy, -1),
        first_window_BJ=jnp.where(any_BJ, lowest_BJ, 0).astype(jnp.int32),
        num_windows_BJ=jnp.where(any_BJ, highest_BJ - lowest_BJ + 1, 0).astype(jnp.int32),
    )


def flat_padded_image(image_BHWC, geometry):
    """(B, windows * R * W, C): rows flattened, zero rows appended to fill the last window."""
    batch, height, width, channels = image_BHWC.shape
    flat = image_BHWC.reshape(batch, height * width, channels)
    extra = geometry.padded_source_pixels - height * width
    return jnp.pad(flat, ((0, 0), (0, extra), (0, 0)))


def load_window(image_hbm, batch, window, window_vmem, semaphore):
    """DMAs window ``window`` (R whole rows) of image ``batch`` from HBM into VMEM; waits."""
    size = window_vmem.shape[0]
    start = pl.multiple_of(window * size, SUBLANES)
    copy = pltpu.make_async_copy(image_hbm.at[batch, pl.ds(start, size)], window_vmem, semaphore)
    copy.start()
    copy.wait()


def interpolation_matrix(index_P4, weight_P4, offset, window_pixels):
    """(P, window) float32: row p holds the weights of pixel p's taps that fall in the window."""
    shape = (index_P4.shape[0], window_pixels)
    column = jax.lax.broadcasted_iota(jnp.int32, shape, 1) + offset
    matrix = jnp.zeros(shape, jnp.float32)
    for tap in range(NUM_TAPS):
        matrix += jnp.where(column == index_P4[:, tap:tap + 1], weight_P4[:, tap:tap + 1], 0.0)
    return matrix


def interpolation_matrix_t(index_4P, weight_4P, offset, window_pixels):
    """(window, P) float32: ``interpolation_matrix`` transposed, built from (4, P) taps."""
    shape = (window_pixels, index_4P.shape[1])
    row = jax.lax.broadcasted_iota(jnp.int32, shape, 0) + offset
    matrix = jnp.zeros(shape, jnp.float32)
    for tap in range(NUM_TAPS):
        matrix += jnp.where(row == index_4P[tap:tap + 1, :], weight_4P[tap:tap + 1, :], 0.0)
    return matrix


def interpret_params(interpret):
    """What ``pallas_call(interpret=...)`` wants: TPU interpret mode (DMAs, semaphores) or off."""
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    return pltpu.InterpretParams() if interpret else False
