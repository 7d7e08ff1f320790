"""Traditional de-identification, for comparison: blur, pixelate or black out the face region.

Each takes a frame and the tracked face box ``[x0, y0, x1, y1]`` and returns a new frame; frames
without a box (None or NaN) come back black, so a baseline never shows an untreated face either.
"""

import numpy as np
from PIL import Image, ImageFilter

ENLARGE = 1.3  # the treated region: the face box grown by this factor (dlib boxes are tight)


def _region(frame_HW3, box_4):
    """Integer [x0, y0, x1, y1] of the enlarged box, clipped to the frame (None if empty)."""
    height, width = frame_HW3.shape[:2]
    box_4 = np.asarray(box_4, float)
    center, side = (box_4[:2] + box_4[2:]) / 2, (box_4[2:] - box_4[:2]) * ENLARGE
    x0, y0 = np.floor(np.maximum(center - side / 2, 0)).astype(int)
    x1, y1 = np.ceil(np.minimum(center + side / 2, [width, height])).astype(int)
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def _treat(frame_HW3, box_4, change_patch):
    """The frame with ``change_patch(patch_hw3)`` applied to the enlarged face region."""
    if box_4 is None or np.isnan(np.asarray(box_4, float)).any():
        return np.zeros_like(frame_HW3)
    out = frame_HW3.copy()
    region = _region(frame_HW3, box_4)
    if region is not None:
        x0, y0, x1, y1 = region
        out[y0:y1, x0:x1] = change_patch(frame_HW3[y0:y1, x0:x1])
    return out


def face_size(box_4):
    """Geometric mean of the box's width and height, in pixels."""
    return float(np.sqrt(max((box_4[2] - box_4[0]) * (box_4[3] - box_4[1]), 0.0)))


def blur(frame_HW3, box_4, sigma_fraction=1 / 8):
    """Gaussian blur with sigma ``sigma_fraction`` of the face size (an eighth: unrecognisable)."""
    sigma = max(1.0, face_size(box_4) * sigma_fraction) if box_4 is not None else 1.0

    def change_patch(patch_hw3):
        return np.asarray(Image.fromarray(patch_hw3).filter(ImageFilter.GaussianBlur(sigma)))
    return _treat(frame_HW3, box_4, change_patch)


def pixelate(frame_HW3, box_4, blocks=8):
    """About ``blocks`` x ``blocks`` cells of mean colour across the face."""
    def change_patch(patch_hw3):
        image = Image.fromarray(patch_hw3)
        cells = image.resize((min(blocks, image.width), min(blocks, image.height)), Image.BOX)
        return np.asarray(cells.resize(image.size, Image.NEAREST))
    return _treat(frame_HW3, box_4, change_patch)


def mask(frame_HW3, box_4):
    """A black box over the face."""
    return _treat(frame_HW3, box_4, np.zeros_like)


BASELINES = {"blur": blur, "pixelate": pixelate, "mask": mask}
