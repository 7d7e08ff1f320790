"""Plain-XLA bilinear grid sampling: the reference that defines the op's semantics.

Matches PyTorch ``F.grid_sample(mode="bilinear")`` values and gradients (input and grid)
for every padding mode and both ``align_corners`` settings, but channels-last:
``image_BHWC`` and ``grid_BHW2`` with (x, y) in [-1, 1]. Each output pixel gathers its four
neighbours from the flattened image (a 4-tap gather, not ``map_coordinates``, which is
several times slower on GPU). Gradients come from JAX autodiff of this code.
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
    """Pixel coordinate to read for each normalised grid coordinate, after padding rules."""
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


def grid_sample_xla(image_BHWC, grid_BHW2, *, padding_mode="zeros", align_corners=True):
    """Bilinear sampling of ``image_BHWC`` at ``grid_BHW2``; returns (B, Ho, Wo, C).

    Weights and accumulation are float32; the result has the image's dtype.
    """
    batch, height, width, channels = image_BHWC.shape
    _, out_h, out_w, _ = grid_BHW2.shape
    grid_BHW2 = grid_BHW2.astype(jnp.float32)
    ix = source_coordinates(grid_BHW2[..., 0], width, padding_mode, align_corners)
    iy = source_coordinates(grid_BHW2[..., 1], height, padding_mode, align_corners)

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
    out_BQC = jnp.zeros((batch, out_h * out_w, channels), jnp.float32)
    for tap_x, tap_y, weight in taps:
        inside = (tap_x >= 0) & (tap_x <= width - 1) & (tap_y >= 0) & (tap_y <= height - 1)
        col = jnp.clip(tap_x, 0, width - 1).astype(jnp.int32)
        row = jnp.clip(tap_y, 0, height - 1).astype(jnp.int32)
        index_BQ = (row * width + col).reshape(batch, -1)
        weight_BQ = jnp.where(inside, weight, 0.0).reshape(batch, -1)
        values_BQC = _gather_rows(flat_image_BPC, index_BQ).astype(jnp.float32)
        out_BQC = out_BQC + values_BQC * weight_BQ[..., None]
    return out_BQC.reshape(batch, out_h, out_w, channels).astype(image_BHWC.dtype)
