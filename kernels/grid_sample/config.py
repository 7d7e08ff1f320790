"""Which implementation runs when the caller names none, and the backends' tile configs.

Tile sizes live in small frozen configs (one per backend, added beside its kernel's
import), so tuning never edits kernel code. The default rule is per platform and may look at
the shapes; it stays on "xla" until a benchmark on the hardware shows a kernel winning at a
shape (the README's warp-op table is the evidence a change here must cite).
"""

import dataclasses

# Implementations tried in order when none is named; each list ends with the reference.
DEFAULT_ORDER = {
    "cpu": ("xla",),
    "gpu": ("xla",),  # pallas_triton: not yet measured on a GPU
    "tpu": ("xla",),  # pallas_mosaic_tpu: not yet measured on a TPU
}


def default_order(platform, image_shape, grid_shape, dtype):
    """Names to try, best first, for one call on ``platform`` ("cpu", "gpu", "tpu")."""
    del image_shape, grid_shape, dtype  # no shape-dependent rule measured yet
    return DEFAULT_ORDER.get(platform, ("xla",))


# --- pallas_triton (GPU) tiles ---------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TritonConfig:
    """Tiles of the Triton kernels: each program takes a block of output pixels x channels.

    Triton blocks are powers of two (tails are masked): the channel block is the smallest power
    of two covering C, capped at ``max_block_channels``; the pixel block fills the rest of
    ``block_elements``. One config per kernel (``TRITON``).
    """
    block_elements: int = 4096      # pixels x channels per program
    max_block_channels: int = 64
    min_block_pixels: int = 16
    num_warps: int = 4
    num_stages: int = 1             # no loop to pipeline but the d_grid channel loop

    def blocks(self, channels):
        """(pixel block, channel block) for images of ``channels`` channels."""
        block_c = min(self.max_block_channels, 1 << max(channels - 1, 0).bit_length())
        return max(self.min_block_pixels, self.block_elements // block_c), block_c


# Per kernel, from ptxas -v for an H100 (sm_90a; compiled on a CPU, never timed on a GPU).
# The old shared default (4096 elements, 4 warps: 32 per thread) spilled in d_grid at every C
# (up to ~2.6 KB). 8 elements per thread (forward, d_image) and 4 (d_grid, which holds the
# cotangent and four taps per channel block) spill nothing at C = 3..512 in either dtype:
# forward 32-91 registers, d_image 48-128, d_grid 64-112 (occupancy 25-100%).
TRITON = {
    "forward": TritonConfig(block_elements=1024, max_block_channels=64, num_warps=4),
    "d_image": TritonConfig(block_elements=1024, max_block_channels=64, num_warps=4),
    "d_grid": TritonConfig(block_elements=512, max_block_channels=32, num_warps=4),
}


# --- pallas_mosaic_tpu (TPU) tiles ----------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MosaicTpuConfig:
    """Tiles of the TPU kernels: 2-D output tiles per grid step, 2-D source windows in VMEM.

    Each step of the pixel-major path (C >= 128) builds a (tile pixels, window pixels) one-hot
    interpolation matrix in VMEM, so its float32 size (256 x 1024 x 4 bytes = 1 MiB at the
    defaults) bounds the working set; the planar path (C < 128) builds separable (window cols
    x tile pixels) and (window rows x tile pixels) matrices instead.
    Unmeasured on a TPU: chosen to fit VMEM and the MXU's 128-wide tiles, not tuned.
    """
    block_rows: int = 16    # output tile; rows * cols a multiple of 128
    block_cols: int = 16
    window_rows: int = 32   # source window of C >= 128 images (pixel-major); cols a multiple
    window_cols: int = 32   # of 16
    # Source window of C < 128 images (planar, ``pallas_mosaic_tpu_planar``): rows a multiple
    # of 16, cols of 128. 256 columns from a 128-aligned start hold a smooth flow's 16 x 16
    # tile footprint in one window; the matrices are (cols x tile pixels) + (rows x tile pixels).
    planar_window_rows: int = 32
    planar_window_cols: int = 256


MOSAIC_TPU = MosaicTpuConfig()
