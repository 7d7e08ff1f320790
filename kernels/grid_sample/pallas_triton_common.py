"""What the Triton forward and backward kernels share: call checks, launch parameters and the
four bilinear taps of a block of output pixels.

Every ref is flat (1-D) and indexed by computed int32 offsets: image element
``(b * H * W + row * W + col) * C + c``, grid element ``2 * p + {0: x, 1: y}`` and output
element ``p * C + c`` for output pixel ``p`` (all grids' pixels in a row, N x Ho x Wo). Grid
rows ``b*T .. b*T + T-1`` read image ``b``, so ``b = p // (T * Ho * Wo)`` and no image is
repeated. Lanes past the tails (pixels, channels) are masked: loads point them at offset 0,
stores past the end (see ``store``).
"""

import dataclasses

import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from safetriage_jax.kernels.grid_sample import reference

PLATFORM = "gpu"            # jax.default_backend()'s name for the kernels' platform
PLATFORMS = ("cuda", "rocm")  # the lowering platforms that compile them (Triton)
INT32_LIMIT = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class Dims:
    """Static sizes of one call (hashable: a kernel parameter)."""
    height: int
    width: int
    channels: int
    pixels_per_image: int     # T * Ho * Wo: output pixels that read one image
    num_pixels: int           # N * Ho * Wo
    padding_mode: str
    align_corners: bool

    @classmethod
    def of(cls, image_BHWC, grid_NHW2, padding_mode, align_corners):
        batch, height, width, channels = image_BHWC.shape
        num_grids, out_h, out_w, _ = grid_NHW2.shape
        num_pixels = num_grids * out_h * out_w
        return cls(height, width, channels, num_pixels // batch, num_pixels, padding_mode,
                   align_corners)


def check_int32_offsets(image_BHWC, grid_NHW2):
    """Raises NotImplementedError when a flat offset would overflow int32 (the op falls through)."""
    channels = image_BHWC.shape[-1]
    sizes = {"image": image_BHWC.size, "output": grid_NHW2.size // 2 * channels,
             "grid": grid_NHW2.size}
    too_big = {name: size for name, size in sizes.items() if size > INT32_LIMIT}
    if too_big:
        raise NotImplementedError(
            f"pallas_triton indexes with int32 offsets and cannot address {too_big} elements "
            f"(limit 2^31 - 1); split the batch or use another implementation.")


def compiler_params(config):
    """Triton launch parameters, always explicit: without them a GPU pallas_call in jax 0.10
    goes to Mosaic GPU, which cannot gather from a ref or scatter-add."""
    return plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)


def lanes(axis, block, size):
    """Indices of this program's block along grid ``axis``, and which are inside ``size``."""
    index = pl.program_id(axis) * block + jnp.arange(block, dtype=jnp.int32)
    inside = index < size
    return jnp.where(inside, index, 0), inside


def load_grid(grid_ref, pixel_P, pixel_ok_P):
    """Normalised grid coordinates (x, y) of each pixel, in float32 (0 for masked pixels)."""
    gx_P = plgpu.load(grid_ref.at[2 * pixel_P], mask=pixel_ok_P, other=0.0).astype(jnp.float32)
    gy_P = plgpu.load(grid_ref.at[2 * pixel_P + 1], mask=pixel_ok_P,
                      other=0.0).astype(jnp.float32)
    return gx_P, gy_P


def source_coordinates(gx_P, gy_P, dims):
    """Image pixel coordinates (ix, iy) read for normalised (x, y), after the padding rule."""
    ix_P = reference.source_coordinates(gx_P, dims.width, dims.padding_mode, dims.align_corners)
    iy_P = reference.source_coordinates(gy_P, dims.height, dims.padding_mode, dims.align_corners)
    return ix_P, iy_P


def taps(ix_P, iy_P, pixel_P, pixel_ok_P, dims):
    """The four bilinear taps in PyTorch's order: (image pixel offset, weight, valid) each.

    The offset is the tap's flat pixel index in the whole image batch (times C gives the
    element offset of channel 0); ``valid`` is false for taps outside the image (they read
    zero) and for masked pixels; the weight is the area of the opposite sub-rectangle (float32,
    zero where not valid).
    """
    base_P = pixel_P // dims.pixels_per_image * (dims.height * dims.width)
    x0 = jnp.floor(ix_P)
    y0 = jnp.floor(iy_P)
    x1 = x0 + 1
    y1 = y0 + 1
    corners = ((x0, y0, (x1 - ix_P) * (y1 - iy_P)), (x1, y0, (ix_P - x0) * (y1 - iy_P)),
               (x0, y1, (x1 - ix_P) * (iy_P - y0)), (x1, y1, (ix_P - x0) * (iy_P - y0)))
    result = []
    for tap_x, tap_y, weight_P in corners:
        valid_P = (pixel_ok_P & (tap_x >= 0) & (tap_x <= dims.width - 1) & (tap_y >= 0)
                   & (tap_y <= dims.height - 1))
        col = jnp.clip(tap_x, 0, dims.width - 1).astype(jnp.int32)
        row = jnp.clip(tap_y, 0, dims.height - 1).astype(jnp.int32)
        result.append((base_P + row * dims.width + col, jnp.where(valid_P, weight_P, 0.0),
                       valid_P))
    return result


def channel_offsets(pixel_offset_P, channel_C, channels):
    """(P, C) flat element offsets of channels ``channel_C`` at pixel offsets ``pixel_offset_P``."""
    return pixel_offset_P[:, None] * channels + channel_C[None, :]


def store(ref, offsets, value, mask):
    """Masked store of ``value`` at flat ``offsets``; masked lanes are sent past the end.

    A GPU never touches masked lanes, but interpret mode writes them back with the value they
    read (a scatter), so a masked lane aliasing a real element (offset 0, or a channel tail
    running into the next pixel) could overwrite it; past the end, the scatter drops them.
    """
    plgpu.store(ref.at[jnp.where(mask, offsets, ref.shape[0])], value, mask=mask)
