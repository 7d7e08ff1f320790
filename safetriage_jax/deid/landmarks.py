"""Facial measurements from 68-point landmarks (iBUG 300-W order), pose- and size-normalised.

Sides are named by the image ("image-left" = smaller x): for an unmirrored video that is the
subject's right. Every function takes (..., 68, 2) arrays, so one call covers a whole video;
frames without landmarks (NaN) give NaN.
"""

import numpy as np

JAW = np.arange(0, 17)
BROW_IMAGE_LEFT, BROW_IMAGE_RIGHT = np.arange(17, 22), np.arange(22, 27)
NOSE_TIP = 30
NOSTRIL_IMAGE_LEFT, NOSTRIL_IMAGE_RIGHT = 31, 35
EYE_IMAGE_LEFT, EYE_IMAGE_RIGHT = np.arange(36, 42), np.arange(42, 48)
MOUTH_CORNER_IMAGE_LEFT, MOUTH_CORNER_IMAGE_RIGHT = 48, 54
INNER_LIPS_TOP, INNER_LIPS_BOTTOM = np.array([61, 62, 63]), np.array([67, 66, 65])
INNER_MOUTH_CORNERS = (60, 64)

ASYMMETRY_INDICES = ("mouth_corner", "eye_opening", "nasolabial", "brow")


def _distance(a, b):
    return np.linalg.norm(a - b, axis=-1)


def eye_centres(points_N68x2):
    return points_N68x2[..., EYE_IMAGE_LEFT, :].mean(-2), points_N68x2[..., EYE_IMAGE_RIGHT, :].mean(-2)


def normalise(points_N68x2):
    """Landmarks in face coordinates: origin between the eyes, x along the eye line (roll
    removed), unit = inter-ocular distance (size removed). Yaw and pitch stay (2-D only)."""
    left, right = eye_centres(points_N68x2)
    axis = right - left
    iod = np.linalg.norm(axis, axis=-1)[..., None, None]
    cos, sin = axis[..., 0:1] / iod[..., 0], axis[..., 1:2] / iod[..., 0]
    centred = points_N68x2 - ((left + right) / 2)[..., None, :]
    x = centred[..., 0] * cos + centred[..., 1] * sin
    y = -centred[..., 0] * sin + centred[..., 1] * cos
    return np.stack([x, y], -1) / iod


def roll_degrees(points_N68x2):
    left, right = eye_centres(points_N68x2)
    axis = right - left
    return np.degrees(np.arctan2(axis[..., 1], axis[..., 0]))


def eye_aspect_ratio(points_N68x2, eye):
    """Eye opening: mean lid distance over eye width (Soukupova & Cech 2016); ~0.3 open, <0.2 shut."""
    p = points_N68x2[..., eye, :]
    vertical = _distance(p[..., 1, :], p[..., 5, :]) + _distance(p[..., 2, :], p[..., 4, :])
    return vertical / (2 * _distance(p[..., 0, :], p[..., 3, :]))


def mouth_opening(points_N68x2):
    """Inner-lip gap over mouth width (0 when closed)."""
    gap = _distance(points_N68x2[..., INNER_LIPS_TOP, :], points_N68x2[..., INNER_LIPS_BOTTOM, :])
    width = _distance(points_N68x2[..., INNER_MOUTH_CORNERS[0], :],
                      points_N68x2[..., INNER_MOUTH_CORNERS[1], :])
    return gap.mean(-1) / width


def asymmetry(points_N68x2):
    """Facial asymmetry indices, image-left minus image-right (0 = symmetric):

    - ``mouth_corner``: corner height difference in face coordinates (positive: left corner lower);
    - ``eye_opening``: log ratio of the eye aspect ratios;
    - ``nasolabial``: nostril-to-mouth-corner distance difference (the nasolabial region);
    - ``brow``: brow-to-eye height difference.
    All lengths are in inter-ocular distances, after the roll is removed.
    """
    face = normalise(points_N68x2)
    left_eye, right_eye = eye_centres(face)
    return {
        "mouth_corner": face[..., MOUTH_CORNER_IMAGE_LEFT, 1] - face[..., MOUTH_CORNER_IMAGE_RIGHT, 1],
        "eye_opening": np.log(eye_aspect_ratio(face, EYE_IMAGE_LEFT)
                              / eye_aspect_ratio(face, EYE_IMAGE_RIGHT)),
        "nasolabial": (_distance(face[..., NOSTRIL_IMAGE_LEFT, :], face[..., MOUTH_CORNER_IMAGE_LEFT, :])
                       - _distance(face[..., NOSTRIL_IMAGE_RIGHT, :],
                                   face[..., MOUTH_CORNER_IMAGE_RIGHT, :])),
        "brow": ((left_eye[..., 1] - face[..., BROW_IMAGE_LEFT, 1].mean(-1))
                 - (right_eye[..., 1] - face[..., BROW_IMAGE_RIGHT, 1].mean(-1))),
    }


def yaw_proxy(points_N68x2):
    """Horizontal offset of the nose tip from the eyes' midpoint, in inter-ocular distances."""
    return normalise(points_N68x2)[..., NOSE_TIP, 0]


def neutral_frame(points_T68x2):
    """Index of the most neutral, frontal frame: small roll and yaw, mouth closed, eyes at
    their usual opening. Frames without landmarks are never chosen."""
    ear = (eye_aspect_ratio(points_T68x2, EYE_IMAGE_LEFT)
           + eye_aspect_ratio(points_T68x2, EYE_IMAGE_RIGHT)) / 2
    usual = np.nanmedian(ear)
    score = (np.abs(yaw_proxy(points_T68x2)) + np.abs(np.radians(roll_degrees(points_T68x2)))
             + mouth_opening(points_T68x2) + np.abs(ear - usual) / usual)
    return int(np.nanargmin(np.where(np.isnan(score), np.inf, score)))


def closest_frame(points_T68x2, target_68x2):
    """Index of the frame whose normalised landmarks are nearest the target's (upstream's
    "best frame" idea: start relative motion from the pose most like the identity image)."""
    error = np.mean(np.sum((normalise(points_T68x2) - normalise(target_68x2)) ** 2, -1), -1)
    return int(np.nanargmin(np.where(np.isnan(error), np.inf, error)))
