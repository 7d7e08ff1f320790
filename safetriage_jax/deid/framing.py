"""Where to crop each frame: a square around the tracked face, sized from its 68 landmarks and
smoothed over time, and the feathered paste of the generated face back into the frame.

Per-frame status: FACE (detected), FILLED (a short detection gap, box interpolated between the
detections around it) or BLANK (no face nearby in time: the output frame is black).
"""

import dataclasses

import numpy as np
from scipy.ndimage import gaussian_filter1d, maximum_filter1d

from safetriage_jax.deid.faces import box_area, resize
from safetriage_jax.errors import SafeTriageError

BLANK, FACE, FILLED = 0, 1, 2

# The face box from the landmarks: jaw to jaw wide; brow to chin high plus a forehead of
# FOREHEAD brow-to-nose-base lengths (a face's upper third); its side is the larger of the two
# times FACE_SIDE_PER_EXTENT, which makes it as large as dlib's detector box on the shared
# driving video (median of 169 frames), so the crop scale keeps its meaning.
FOREHEAD = 0.5
FACE_SIDE_PER_EXTENT = 0.85
BROWS, NOSE_BASE = slice(17, 27), 33


@dataclasses.dataclass(frozen=True)
class FramingOptions:
    scale: float = 1.8  # crop side / face box side (VoxCeleb-like: hair, chin and some neck)
    raise_by: float = 0.1  # crop centre above the face box centre, in box sides (hair over chin)
    smooth_seconds: float = 0.1  # Gaussian sigma of the crop path (removes detector jitter)
    hold_seconds: float = 0.5  # the crop side is the largest face side this long either side
    max_gap_seconds: float = 0.2  # detection gaps up to this long are interpolated, longer ones blanked
    feather: float = 0.1  # width of the paste-back blend, as a fraction of the crop side
    cover_margin: float = 0.1  # paste-back must cover the 68-point outline grown by this share

    def __post_init__(self):
        for name, low, high in RANGES:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and low <= value <= high):
                raise SafeTriageError(f"The framing option {name} must be between {low} and {high} "
                                      f"(got {value!r}).")


# Allowed ranges: a smaller crop cannot hold the face and its surroundings, a wider feather
# leaves no opaque middle, and a negative margin would accept a partly covered face.
RANGES = (("scale", 1.2, 5.0), ("raise_by", -0.5, 0.5), ("smooth_seconds", 0.0, 2.0),
          ("hold_seconds", 0.0, 5.0), ("max_gap_seconds", 0.0, 5.0), ("feather", 0.01, 0.4),
          ("cover_margin", 0.0, 1.0))


@dataclasses.dataclass
class CropPlan:
    centers_T2: np.ndarray  # crop centre (x, y) in frame pixels; NaN on BLANK frames
    sides_T: np.ndarray  # crop side in frame pixels
    status_T: np.ndarray  # BLANK / FACE / FILLED per frame

    def counts(self):
        return {name: int((self.status_T == code).sum())
                for name, code in (("face", FACE), ("filled", FILLED), ("blank", BLANK))}


def runs(mask_T):
    """(start, stop) of each run of True."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask_T.astype(np.int8), [0]])))
    return list(zip(edges[::2], edges[1::2]))


def face_boxes(landmarks_T68x2):
    """Square face boxes [x0, y0, x1, y1] from 68-point landmarks (NaN rows where missing).

    Centred on the landmarks' extent (jaw to jaw, brow to chin), so an opening mouth keeps the
    chin inside; sized by the extent plus a forehead (see FOREHEAD), both axes.
    """
    low_T2, high_T2 = landmarks_T68x2.min(1), landmarks_T68x2.max(1)
    brows_T = landmarks_T68x2[:, BROWS, 1]
    forehead_T = FOREHEAD * (landmarks_T68x2[:, NOSE_BASE, 1] - brows_T.mean(1))
    extent_T = np.maximum(high_T2[:, 0] - low_T2[:, 0], high_T2[:, 1] - low_T2[:, 1] + forehead_T)
    half_T = FACE_SIDE_PER_EXTENT * extent_T / 2
    center_T2 = (low_T2 + high_T2) / 2
    return np.concatenate([center_T2 - half_T[:, None], center_T2 + half_T[:, None]], -1)


def plan_crops(boxes_T4, fps, options=FramingOptions()):
    """Crop squares for a track's face boxes (NaN where the face was not found): their sides
    held at the largest within ``hold_seconds`` (a face that opens its mouth does not zoom the
    crop), then centres and sides smoothed."""
    found_T = ~np.isnan(boxes_T4[:, 0])
    side_T = np.sqrt(box_area(np.nan_to_num(boxes_T4)))
    center_T2 = (boxes_T4[:, :2] + boxes_T4[:, 2:]) / 2
    center_T2[:, 1] -= options.raise_by * side_T
    status_T = np.where(found_T, FACE, BLANK)
    max_gap = int(round(options.max_gap_seconds * fps))
    times = np.arange(len(boxes_T4))
    for start, stop in runs(~found_T):
        if start > 0 and stop < len(found_T) and stop - start <= max_gap:
            status_T[start:stop] = FILLED
    keep = status_T != BLANK
    hold = 2 * int(round(options.hold_seconds * fps)) + 1
    for column in (center_T2[:, 0], center_T2[:, 1], side_T):
        column[~found_T] = np.nan
        for start, stop in runs(keep):  # smooth each stretch on its own: never across a blank
            values = column[start:stop]
            known = ~np.isnan(values)
            values = np.interp(times[start:stop], times[start:stop][known], values[known])
            if column is side_T:
                values = maximum_filter1d(values, hold, mode="nearest")
            sigma = options.smooth_seconds * fps
            column[start:stop] = gaussian_filter1d(values, sigma, mode="nearest") if sigma > 0 else values
        column[~keep] = np.nan
    return CropPlan(center_T2, side_T * options.scale, status_T)


def feather_mask(size, feather):
    """(size, size) blend weights: 1 inside a rounded square, falling to 0 at its edge over
    ``feather`` of the side. The face, in the middle of the crop, is always fully covered."""
    r = np.abs(np.linspace(-1, 1, size))
    radius = (r[:, None] ** 4 + r[None, :] ** 4) ** 0.25  # a squircle
    return np.clip((1 - radius) / (2 * feather), 0, 1).astype(np.float32)[..., None]


def paste(frame_HW3, face_SS3, center_2, side, feather):
    """The frame with ``face_SS3`` resized onto the square of ``side`` at ``center_2``, blended
    with a feathered mask; parts of the square outside the frame are dropped."""
    height, width = frame_HW3.shape[:2]
    side = max(int(round(side)), 2)
    x0, y0 = int(round(center_2[0] - side / 2)), int(round(center_2[1] - side / 2))
    face = resize(face_SS3, side, side).astype(np.float32)
    weight = feather_mask(side, feather)
    fx0, fy0 = max(-x0, 0), max(-y0, 0)
    fx1, fy1 = min(side, width - x0), min(side, height - y0)
    if fx1 <= fx0 or fy1 <= fy0:
        return frame_HW3
    out = frame_HW3.copy()
    region = out[y0 + fy0:y0 + fy1, x0 + fx0:x0 + fx1].astype(np.float32)
    w = weight[fy0:fy1, fx0:fx1]
    blended = region * (1 - w) + face[fy0:fy1, fx0:fx1] * w
    out[y0 + fy0:y0 + fy1, x0 + fx0:x0 + fx1] = np.round(blended).astype(np.uint8)
    return out


def _opaque(center_2, side, feather, points_N2):
    """Whether every point lies where :func:`paste` blends with full weight (same rounding)."""
    side = max(int(round(side)), 2)
    corner_2 = np.round(np.asarray(center_2) - side / 2)
    u_N2 = (points_N2 - corner_2) / (side - 1) * 2 - 1  # feather_mask's [-1, 1] coordinates
    radius_N = (np.abs(u_N2) ** 4).sum(-1) ** 0.25
    return bool(np.all((1 - radius_N) / (2 * feather) >= 1))


def face_outline(landmarks_68x2, margin):
    """The 68 landmarks pushed out from their centre by ``margin`` of their extent."""
    center_2 = landmarks_68x2.mean(0)
    return center_2 + (landmarks_68x2 - center_2) * (1 + margin)


def uncovered_frames(plan, landmarks_T68x2, options=FramingOptions()):
    """Frames whose paste-back would leave part of the face (its outline with a margin) showing.

    A frame with a detected face is checked against its own landmarks; a FILLED frame against
    the nearest detected frames before and after it. Returns a boolean mask over the frames.
    """
    found_T = ~np.isnan(landmarks_T68x2[:, 0, 0])
    detected = np.flatnonzero(found_T)
    uncovered_T = np.zeros(len(plan.status_T), bool)
    for t in np.flatnonzero(plan.status_T != BLANK):
        if found_T[t]:
            neighbours = [t]
        else:
            at = np.searchsorted(detected, t)
            neighbours = list(detected[max(at - 1, 0):at + 1])
        uncovered_T[t] = not neighbours or not all(
            _opaque(plan.centers_T2[t], plan.sides_T[t], options.feather,
                    face_outline(landmarks_T68x2[n], options.cover_margin)) for n in neighbours)
    return uncovered_T


MASK_GROW = 1.6  # a masked face's square: its detector box side x this (forehead, hair, chin)


def subject_box(track, plan, options, t):
    """The followed face's box in frame ``t``: detected, else from the crop plan (FILLED);
    None on BLANK frames."""
    if track.found_T[t]:
        return track.boxes_T4[t]
    if plan.status_T[t] == BLANK:
        return None
    side = plan.sides_T[t] / options.scale
    cx, cy = plan.centers_T2[t, 0], plan.centers_T2[t, 1] + options.raise_by * side
    return np.array([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2])


def other_faces(track, plan, options=FramingOptions(), min_iou=0.2):
    """Per frame, the squares ([x0, y0, x1, y1]) to black out in paste-back output: every face
    found (``track.faces_T``) that is not the followed one, grown by MASK_GROW. A face found in
    one frame is masked in the frames up to ``max_gap_seconds`` around it as well, so a short
    miss of the detector does not let it through."""
    from safetriage_jax.deid.faces import box_iou
    count = track.num_frames
    found_T = [np.zeros((0, 4))] * count
    for t, boxes_N4 in enumerate(track.faces_T[:count]):
        subject = subject_box(track, plan, options, t)
        others = [b for b in boxes_N4
                  if subject is None or box_iou(subject, b[None])[0] < min_iou]
        if others:
            others = np.array(others)
            side_N = np.sqrt(box_area(others)) * MASK_GROW
            cx_N, cy_N = (others[:, 0] + others[:, 2]) / 2, (others[:, 1] + others[:, 3]) / 2
            cy_N = cy_N - options.raise_by * side_N / MASK_GROW
            found_T[t] = np.stack([cx_N - side_N / 2, cy_N - side_N / 2,
                                   cx_N + side_N / 2, cy_N + side_N / 2], -1)
    reach = int(np.ceil(options.max_gap_seconds * track.fps))
    return [np.concatenate(found_T[max(t - reach, 0):t + reach + 1]) for t in range(count)]


def black_out(frame_HW3, squares_N4):
    """The frame with every square set to black (clipped to the frame)."""
    if not len(squares_N4):
        return frame_HW3
    out = frame_HW3.copy()
    height, width = out.shape[:2]
    for x0, y0, x1, y1 in np.round(squares_N4).astype(int):
        out[max(y0, 0):max(min(y1, height), 0), max(x0, 0):max(min(x1, width), 0)] = 0
    return out
