"""Traditional de-identification, for comparison: blur, pixelate or black out the face region.

Each takes a frame and the tracked face box and returns a new frame; frames without a box come
back black, so the baselines never show an untreated face either.
"""

import numpy as np
from PIL import Image, ImageFilter

ENLARGE = 1.3  # the treated region: the face box grown by this factor (dlib boxes are tight)


def _region(frame_HW3, box_4):
    """Integer [x0, y0, x1, y1] of the enlarged box, clipped to the frame (None if empty)."""
    height, width = frame_HW3.shape[:2]
    center, side = (box_4[:2] + box_4[2:]) / 2, (box_4[2:] - box_4[:2]) * ENLARGE
    x0, y0 = np.floor(np.maximum(center - side / 2, 0)).astype(int)
    x1, y1 = np.ceil(np.minimum(center + side / 2, [width, height])).astype(int)
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def _treat(frame_HW3, box_4, change):
    if box_4 is None or np.isnan(box_4).any():
        return np.zeros_like(frame_HW3)
    region = _region(frame_HW3, box_4)
    out = frame_HW3.copy()
    if region is not None:
        x0, y0, x1, y1 = region
        out[y0:y1, x0:x1] = change(frame_HW3[y0:y1, x0:x1], box_4)
    return out


def blur(frame_HW3, box_4):
    """Gaussian blur, sigma an eighth of the face size."""
    sigma = float(max(1.0, np.sqrt(np.prod(box_4[2:] - box_4[:2])) / 8))
    change = lambda patch, _: np.asarray(Image.fromarray(patch).filter(ImageFilter.GaussianBlur(sigma)))
    return _treat(frame_HW3, box_4, change)


def pixelate(frame_HW3, box_4, blocks=8):
    """About ``blocks`` x ``blocks`` cells of mean colour across the face."""
    def change(patch, _):
        image = Image.fromarray(patch)
        small = image.resize((blocks, blocks), Image.BOX)
        return np.asarray(small.resize(image.size, Image.NEAREST))
    return _treat(frame_HW3, box_4, change)


def mask(frame_HW3, box_4):
    """A black box over the face."""
    return _treat(frame_HW3, box_4, lambda patch, _: np.zeros_like(patch))


BASELINES = {"blur": blur, "pixelate": pixelate, "mask": mask}
