"""Plain-XLA bilinear grid sampling: the reference that defines the op's semantics.

Semantics (PyTorch ``F.grid_sample(mode="bilinear")``, channels-last):

- ``image_BHWC`` (float32 or bfloat16) is read at ``grid_NHW2``, (x, y) in [-1, 1]; the grid
  batch N is a multiple T of the image batch B and grid row ``b * T + t`` reads image ``b``.
- ``align_corners=True``: -1 and 1 are the centres of the corner pixels; False: their outer
  edges. ``padding_mode``: "zeros" (taps outside the image read 0), "border" (coordinates
  clamped to the image) or "reflection" (coordinates reflected at the borders, then clamped).
- Each output is the four neighbouring taps weighted by the areas of the opposite
  sub-rectangles; weights and accumulation are float32, the result has the image's dtype.
- Gradients are those of this code under autodiff, which equal PyTorch's: d_image is the
  scatter-add of the cotangent with the same weights; d_grid is zero where a coordinate is
  clamped at (or beyond) a border, and reflections flip its sign.

Every backend of the op reproduces these values and both gradients. This one gathers the four
taps from the flattened image (a 4-tap gather, not ``map_coordinates``, which is several times
slower on GPU).
"""

import jax
import jax.numpy as jnp


def _unnormalize(coord, size, align_corners):
    """Maps [-1, 1] to pixel coordinates (corner pixels' centres, or their outer edges)."""
    if align_corners:
        return (coord + 1) / 2 * (size - 1)
    return ((coord + 1) * size - 1) / 2


def _clip(coord, size):
    """Clamps to [0, size - 1]; gradient 1 strictly inside, 0 on and beyond the edges (as PyTorch)."""
    return jnp.where(coord <= 0, 0.0, jnp.where(coord >= size - 1, size - 1.0, coord))


def _reflect(coord, twice_low, twice_high):
    """Reflects ``coord`` into [twice_low / 2, twice_high / 2] as PyTorch does (grad ±1)."""
    if twice_low == twice_high:
        return jnp.zeros_like(coord)
    low = twice_low / 2
    span = (twice_high - twice_low) / 2
    dist = coord - low
    dist = jnp.where(dist < 0, -dist, dist)
    extra = jnp.fmod(dist, span)
    flips = jnp.floor(dist / span)
    return jnp.where(jnp.fmod(flips, 2) == 0, extra + low, span - extra + low)


def source_coordinates(coord, size, padding_mode, align_corners):
    """Pixel coordinate to read for each normalised grid coordinate, after padding rules.

    Pure elementwise jnp: backends may call it inside their kernels, or differentiate it
    (``jax.vjp``) to chain a gradient in pixel coordinates back to the grid.
    """
    coord = _unnormalize(coord, size, align_corners)
    if padding_mode == "border":
        coord = _clip(coord, size)
    elif padding_mode == "reflection":
        if align_corners:
            coord = _reflect(coord, 0, 2 * (size - 1))
        else:
            coord = _reflect(coord, -1, 2 * size - 1)
        coord = _clip(coord, size)
    return coord


def _gather_rows(flat_image_BPC, index_BQ):
    """Per-batch row gather: out[b, q] = flat_image[b, index[b, q]]."""
    return jax.vmap(lambda image_PC, index_Q: image_PC[index_Q])(flat_image_BPC, index_BQ)


def grid_sample(image_BHWC, grid_NHW2, *, padding_mode="zeros", align_corners=True,
                interpret=None):
    """Bilinear sampling of ``image_BHWC`` at ``grid_NHW2`` (N = T x B); returns (N, Ho, Wo, C).

    ``interpret`` is accepted for a uniform backend signature and ignored (plain XLA).
    """
    del interpret
    batch, height, width, channels = image_BHWC.shape
    num_grids, out_h, out_w, _ = grid_NHW2.shape
    # Grid rows b*T .. b*T + T-1 all read image b: sample them as one (T*Ho, Wo) grid.
    grid_BQ2 = grid_NHW2.astype(jnp.float32).reshape(batch, -1, 2)
    ix = source_coordinates(grid_BQ2[..., 0], width, padding_mode, align_corners)
    iy = source_coordinates(grid_BQ2[..., 1], height, padding_mode, align_corners)

    x0 = jnp.floor(ix)
    y0 = jnp.floor(iy)
    x1 = x0 + 1
    y1 = y0 + 1
    # PyTorch's weight order: each tap weighted by the area of the opposite sub-rectangle.
    taps = (
        (x0, y0, (x1 - ix) * (y1 - iy)),
        (x1, y0, (ix - x0) * (y1 - iy)),
        (x0, y1, (x1 - ix) * (iy - y0)),
        (x1, y1, (ix - x0) * (iy - y0)),
    )

    flat_image_BPC = image_BHWC.reshape(batch, height * width, channels)
    out_BQC = jnp.zeros(grid_BQ2.shape[:2] + (channels,), jnp.float32)
    for tap_x, tap_y, weight_BQ in taps:
        inside = (tap_x >= 0) & (tap_x <= width - 1) & (tap_y >= 0) & (tap_y <= height - 1)
        col = jnp.clip(tap_x, 0, width - 1).astype(jnp.int32)
        row = jnp.clip(tap_y, 0, height - 1).astype(jnp.int32)
        index_BQ = row * width + col
        weight_BQ = jnp.where(inside, weight_BQ, 0.0)
        values_BQC = _gather_rows(flat_image_BPC, index_BQ).astype(jnp.float32)
        out_BQC = out_BQC + values_BQC * weight_BQ[..., None]
    return out_BQC.reshape(num_grids, out_h, out_w, channels).astype(image_BHWC.dtype)
