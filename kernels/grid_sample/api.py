"""The public grid-sample op: one function, a registry of implementations, a fallback order.

Backends join ``IMPLEMENTATIONS`` when their module imports. A backend that cannot take a case
(dtype, size) raises ``NotImplementedError`` and the next one in the platform's default order
(``config.default_order``, which always ends with the reference) runs instead.
"""

import logging

import jax
import jax.numpy as jnp

from safetriage_jax.kernels.grid_sample import config, reference

log = logging.getLogger(__name__)

PADDING_MODES = ("zeros", "border", "reflection")
IMPLEMENTATIONS = {"xla": reference.grid_sample}
UNAVAILABLE = {}  # name -> why its module did not import here

try:
    from safetriage_jax.kernels.grid_sample import pallas_triton
    IMPLEMENTATIONS["pallas_triton"] = pallas_triton.grid_sample
except ImportError as err:  # a jaxlib without Pallas/Triton support
    UNAVAILABLE["pallas_triton"] = str(err)

try:
    from safetriage_jax.kernels.grid_sample import pallas_mosaic_tpu
    IMPLEMENTATIONS["pallas_mosaic_tpu"] = pallas_mosaic_tpu.grid_sample
except ImportError as err:  # a jaxlib without Pallas/Mosaic support
    UNAVAILABLE["pallas_mosaic_tpu"] = str(err)


def check_arguments(image_BHWC, grid_NHW2, padding_mode):
    """Raises ValueError unless the shapes, dtypes and padding mode make a valid call."""
    if image_BHWC.ndim != 4 or grid_NHW2.ndim != 4 or grid_NHW2.shape[-1] != 2:
        raise ValueError(
            f"grid_sample wants image (B, H, W, C) and grid (B, Ho, Wo, 2); got image "
            f"{tuple(image_BHWC.shape)} and grid {tuple(grid_NHW2.shape)}.")
    batch, num_grids = image_BHWC.shape[0], grid_NHW2.shape[0]
    if batch == 0 or num_grids % batch:
        raise ValueError(
            f"grid_sample: the grid batch ({num_grids}) must be a multiple T of the image batch "
            f"({batch}); grid row b*T + t reads image b.")
    if not (jnp.issubdtype(image_BHWC.dtype, jnp.floating)
            and jnp.issubdtype(grid_NHW2.dtype, jnp.floating)):
        raise ValueError(f"grid_sample wants floating-point image and grid; got "
                         f"{image_BHWC.dtype} and {grid_NHW2.dtype}.")
    if padding_mode not in PADDING_MODES:
        raise ValueError(
            f"grid_sample: padding_mode {padding_mode!r} is not one of {PADDING_MODES}.")


def implementation_order(implementation, image_BHWC, grid_NHW2):
    """Names to try for one call: the named one first, then the platform's default order."""
    defaults = config.default_order(jax.default_backend(), image_BHWC.shape, grid_NHW2.shape,
                                    image_BHWC.dtype)
    if implementation is None:
        return defaults
    if implementation not in IMPLEMENTATIONS:
        known = sorted(set(IMPLEMENTATIONS) | set(UNAVAILABLE))
        why = f" (not available here: {UNAVAILABLE[implementation]})" \
            if implementation in UNAVAILABLE else ""
        raise ValueError(f"grid_sample: implementation {implementation!r} is not one of "
                         f"{known}{why}.")
    return (implementation,) + tuple(name for name in defaults if name != implementation)


def grid_sample(image_BHWC, grid_NHW2, *, padding_mode="zeros", align_corners=True,
                implementation=None, interpret=None):
    """Bilinear sampling with PyTorch ``F.grid_sample`` semantics, channels-last.

    Args:
      image_BHWC: images to read from, float32 or bfloat16.
      grid_NHW2: where to read, (x, y) in [-1, 1]. N = T x B: grid row ``b * T + t`` reads
        image ``b`` (T frames warping one shared image need no copies of it).
      padding_mode: "zeros", "border" or "reflection" (what lies outside the image).
      align_corners: True if -1 and 1 are the corner pixels' centres, False if their edges.
      implementation: None tries the platform's default order (``config.default_order``);
        a name ("xla", "pallas_triton", "pallas_mosaic_tpu") is tried first, then that order.
      interpret: run Pallas kernels in interpret mode; None interprets whenever the platform
        is not the kernel's own.
    Returns:
      (N, Ho, Wo, C) samples, in the image's dtype. See ``reference`` for the exact semantics.
    """
    check_arguments(image_BHWC, grid_NHW2, padding_mode)
    for name in implementation_order(implementation, image_BHWC, grid_NHW2):
        try:
            return IMPLEMENTATIONS[name](image_BHWC, grid_NHW2, padding_mode=padding_mode,
                                         align_corners=align_corners, interpret=interpret)
        except NotImplementedError as err:
            log.info("grid_sample: %s cannot take image %s %s, grid %s (%s); trying the next.",
                     name, image_BHWC.shape, image_BHWC.dtype, grid_NHW2.shape, err)
    raise AssertionError("unreachable: every default order ends with the reference")
