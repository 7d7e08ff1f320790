"""Which implementation runs when the caller names none, and the backends' tile configs.

Tile sizes live in small frozen configs (one per backend, added beside its kernel's
import), so tuning never edits kernel code. The default rule is per platform and may look at
the shapes; it stays on "xla" until a benchmark on the hardware shows a kernel winning at a
shape (the README's warp-op table is the evidence a change here must cite).
"""

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
