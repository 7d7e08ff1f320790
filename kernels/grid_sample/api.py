"""The public grid-sample op and its dispatcher: the one function the model warps with."""

from safetriage_jax.errors import SafeTriageError
from safetriage_jax.kernels.grid_sample.xla import grid_sample_xla

PADDING_MODES = ("zeros", "border", "reflection")
IMPLEMENTATIONS = {"xla": grid_sample_xla}


def grid_sample(image_BHWC, grid_BHW2, *, padding_mode="zeros", align_corners=True,
                implementation=None):
    """Bilinear sampling with PyTorch ``F.grid_sample`` semantics, channels-last.

    Args:
      image_BHWC: images to read from, float32 or bfloat16.
      grid_BHW2: where to read, (x, y) in [-1, 1]; output has the grid's spatial shape.
      padding_mode: "zeros", "border" or "reflection" (what lies outside the image).
      align_corners: True if -1 and 1 are the corner pixels' centres, False if their edges.
      implementation: None picks the best available; "xla" is the reference, always there.
    Returns:
      (B, Ho, Wo, C) samples, in the image's dtype.
    """
    if image_BHWC.ndim != 4 or grid_BHW2.ndim != 4 or grid_BHW2.shape[-1] != 2:
        raise SafeTriageError(
            f"grid_sample wants image (B, H, W, C) and grid (B, Ho, Wo, 2); got image "
            f"{tuple(image_BHWC.shape)} and grid {tuple(grid_BHW2.shape)}.")
    if image_BHWC.shape[0] != grid_BHW2.shape[0]:
        raise SafeTriageError(
            f"grid_sample: image batch {image_BHWC.shape[0]} != grid batch "
            f"{grid_BHW2.shape[0]}; broadcast one of them first.")
    if padding_mode not in PADDING_MODES:
        raise SafeTriageError(
            f"grid_sample: padding_mode {padding_mode!r} is not one of {PADDING_MODES}.")
    name = implementation or "xla"
    if name not in IMPLEMENTATIONS:
        raise SafeTriageError(
            f"grid_sample: implementation {name!r} is not one of {sorted(IMPLEMENTATIONS)}.")
    return IMPLEMENTATIONS[name](image_BHWC, grid_BHW2, padding_mode=padding_mode,
                                 align_corners=align_corners)
