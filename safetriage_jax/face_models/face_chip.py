"""dlib's face chips on device: the aligned 150x150 crop its face embedding reads.

dlib (``get_face_chip_details`` + ``extract_image_chips``, dlib/image_transforms/
interpolation.h, 20.0) fits a similarity transform from a template face to the landmarks, which
gives the chip's square in the image (centre, side, angle). When that square is more than twice
the chip's size, the image is first shrunk by dlib's 2:1 pyramid (a 5x5 [1 4 6 4 1] binomial
filter in integers, every other pixel, truncated to uint8), as many times as keeps the square
above chip size; the pyramid is built on a box around the square only (the square's bounding box
grown by a margin, rounded to whole pixels), which fixes the pyramid's pixel phase. Each chip
pixel is then read bilinearly, as 0 where its 2x2 neighbourhood leaves that image, and truncated
to uint8.

Here the geometry (a few hundred floating point operations per face, in float64 like dlib's) runs
in numpy and gives each face a box, a pyramid level and an affine map from chip pixels; the
images are shifted to their boxes, shrunk and resampled on device, batched, with the project's
warp op (``kernels.grid_sample``, bilinear, float32).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from safetriage_jax.kernels.grid_sample.api import grid_sample

CHIP_SIZE = 150  # compute_face_descriptor's chip: 150x150 with padding 0.25
CHIP_PADDING = 0.25
CROP_STEP = 64  # face boxes are cut out in multiples of this size
ROUNDING_SLACK = 2e-5  # see extract_chips: float32 vs dlib's double at whole numbers

# dlib's mean face (interpolation.h, get_face_chip_details): iBUG 300-W points 17-67 in a unit
# square; the chip uses the eyes, nose and upper lip (points 27-54 and 60-64).
_MEAN_FACE_X = (
    0.000213256, 0.0752622, 0.18113, 0.29077, 0.393397, 0.586856, 0.689483, 0.799124, 0.904991,
    0.98004, 0.490127, 0.490127, 0.490127, 0.490127, 0.36688, 0.426036, 0.490127, 0.554217,
    0.613373, 0.121737, 0.187122, 0.265825, 0.334606, 0.260918, 0.182743, 0.645647, 0.714428,
    0.793132, 0.858516, 0.79751, 0.719335, 0.254149, 0.340985, 0.428858, 0.490127, 0.551395,
    0.639268, 0.726104, 0.642159, 0.556721, 0.490127, 0.423532, 0.338094, 0.290379, 0.428096,
    0.490127, 0.552157, 0.689874, 0.553364, 0.490127, 0.42689)
_MEAN_FACE_Y = (
    0.106454, 0.038915, 0.0187482, 0.0344891, 0.0773906, 0.0773906, 0.0344891, 0.0187482,
    0.038915, 0.106454, 0.203352, 0.307009, 0.409805, 0.515625, 0.587326, 0.609345, 0.628106,
    0.609345, 0.587326, 0.216423, 0.178758, 0.179852, 0.231733, 0.245099, 0.244077, 0.231733,
    0.179852, 0.178758, 0.216423, 0.244077, 0.245099, 0.780233, 0.745405, 0.727388, 0.742578,
    0.727388, 0.745405, 0.780233, 0.864805, 0.902192, 0.909281, 0.902192, 0.864805, 0.784792,
    0.778746, 0.785343, 0.778746, 0.784792, 0.824182, 0.831803, 0.824182)
# dlib's 5-point template (shape_predictor_5_face_landmarks order: eye corners, nose).
_FIVE_POINT_TEMPLATE = ((0.8595674595992, 0.2134981538014), (0.6460604764104, 0.2289674387677),
                        (0.1205750620789, 0.2137274526848), (0.3340850613712, 0.2290642403242),
                        (0.4901123135679, 0.6277975316475))
_CHIP_POINTS_68 = np.array([i for i in range(27, 68) if not (55 <= i <= 59 or 65 <= i <= 67)])


def template(num_points, size, padding):
    """(landmark indices, their template positions in chip pixels (N, 2))."""
    if num_points == 68:
        unit_N2 = np.stack([_MEAN_FACE_X, _MEAN_FACE_Y], -1)[_CHIP_POINTS_68 - 17]
        indices = _CHIP_POINTS_68
    elif num_points == 5:
        unit_N2, indices = np.array(_FIVE_POINT_TEMPLATE), np.arange(5)
    else:
        raise ValueError(f"face chips need 68 (iBUG 300-W) or 5 landmarks, got {num_points}")
    return indices, (padding + unit_N2) / (2 * padding + 1) * size


def similarity_transform(from_N2, to_N2):
    """The least-squares similarity (Umeyama 1991, eqs. 34-43) mapping from_N2 onto to_N2:
    (scaled rotation 2x2, translation 2)."""
    mean_from, mean_to = from_N2.mean(0), to_N2.mean(0)
    centred_from, centred_to = from_N2 - mean_from, to_N2 - mean_to
    var_from = (centred_from ** 2).sum(1).mean()
    cov_22 = centred_to.T @ centred_from / len(from_N2)
    u, d, vt = np.linalg.svd(cov_22)
    s = np.ones(2)
    if np.linalg.det(cov_22) < 0 or (np.linalg.det(cov_22) == 0
                                     and np.linalg.det(u) * np.linalg.det(vt) < 0):
        s[1 if d[1] < d[0] else 0] = -1  # no reflections: flip the smaller axis
    rotation = u @ np.diag(s) @ vt
    scale = (d * s).sum() / var_from if var_from else 1.0
    return scale * rotation, mean_to - scale * rotation @ mean_from


def _rotate(centre_2, point_2, angle):
    c, s = np.cos(angle), np.sin(angle)
    x, y = point_2 - centre_2
    return np.array([c * x - s * y, s * x + c * y]) + centre_2


def _rect_down(rect):
    """pyramid_down<2>'s mapping of a rectangle [l, t, r, b] to the next level."""
    return rect / 2.0 - np.array([1.25, 0.75, 1.25, 0.75])


def _area(rect):
    """dlib's drectangle area: (r - l + 1) (b - t + 1), 0 when empty."""
    width, height = rect[2] - rect[0] + 1, rect[3] - rect[1] + 1
    return 0.0 if rect[0] > rect[2] or rect[1] > rect[3] else width * height


def _corners(rect, angle):
    """The rectangle's corners tl, tr, bl, br rotated about its centre by angle."""
    centre = np.array([rect[0] + rect[2], rect[1] + rect[3]]) / 2.0
    return [_rotate(centre, np.array(p, float), angle) for p in
            ((rect[0], rect[1]), (rect[2], rect[1]), (rect[0], rect[3]), (rect[2], rect[3]))]


def chip_square(landmarks_Nx2, size=CHIP_SIZE, padding=CHIP_PADDING):
    """dlib's ``get_face_chip_details``: the chip's rectangle [l, t, r, b] and angle (radians)."""
    indices, chip_N2 = template(len(landmarks_Nx2), size, padding)
    matrix_22, shift_2 = similarity_transform(chip_N2, np.asarray(landmarks_Nx2, float)[indices])
    angle = np.arctan2(matrix_22[1, 0], matrix_22[0, 0])
    scale = np.hypot(matrix_22[0, 0], matrix_22[1, 0])
    centre = matrix_22 @ np.array([size / 2.0, size / 2.0]) + shift_2
    half = (size * scale - 1) / 2  # dlib's centered_drect(p, w, h) spans w - 1
    return np.array([centre[0] - half, centre[1] - half, centre[0] + half, centre[1] + half]), angle


def chip_plan(landmarks_Nx2, height, width, size=CHIP_SIZE, padding=CHIP_PADDING):
    """Where one chip comes from, as dlib's ``extract_image_chips`` takes it.

    Returns a dict: ``box_xy``, ``box_wh`` (its box: top-left corner and size), ``level``
    (pyramid level: 0 is the image itself), ``level_wh`` (that level's size for the box),
    ``affine_23`` (chip pixel (x, y, 1) to pixel of that level, in the box's frame).
    """
    rect, angle = chip_square(landmarks_Nx2, size, padding)
    down, grow = _rect_down(rect), 2.0
    while _area(down) > size * size:
        down, grow = _rect_down(down), grow * 2 + 2
    corners = np.array(_corners(rect, angle))
    grown = np.concatenate([corners.min(0) - grow, corners.max(0) + grow])
    grown = np.maximum(grown, [0, 0, -np.inf, -np.inf])
    grown = np.minimum(grown, [np.inf, np.inf, width - 1, height - 1])
    box = np.floor(np.abs(grown) + 0.5) * np.sign(grown)  # std::lround: halves away from 0
    box_size = box_wh = (int(box[2] - box[0]) + 1, int(box[3] - box[1]) + 1)
    rect = rect - np.array([box[0], box[1], box[0], box[1]])
    level = 0
    while _area(_rect_down(rect)) > size * size:
        rect, level = _rect_down(rect), level + 1
        box_wh = ((box_wh[0] - 3) // 2, (box_wh[1] - 3) // 2)
    tl, tr, bl, _ = _corners(rect, angle)
    affine_23 = np.stack([(tr - tl) / (size - 1), (bl - tl) / (size - 1), tl], -1)
    return {"box_xy": box[:2].astype(int), "box_wh": box_size, "level": level,
            "level_wh": box_wh, "affine_23": affine_23}


def pyramid_down(image_BHWC):
    """dlib's pyramid_down<2> on integer-valued float images: [1 4 6 4 1] x [1 4 6 4 1] sums
    at every other pixel (unpadded: size (n - 3) // 2), divided by 256 and truncated."""
    taps = (1.0, 4.0, 6.0, 4.0, 1.0)

    def filter_axis(x, axis):
        out = (x.shape[axis] - 3) // 2
        take = lambda start: jax.lax.slice_in_dim(x, start, start + 2 * out - 1, 2, axis)
        return sum(tap * take(i) for i, tap in enumerate(taps))

    return jnp.floor(filter_axis(filter_axis(image_BHWC, 2), 1) / 256.0)


@functools.partial(jax.jit, static_argnames=("levels", "size", "crop_hw"))
def _extract(images_BHWC, box_xy_B2, level_B, level_wh_B2, affine_B23, *, levels, size,
             crop_hw):
    batch, channels = images_BHWC.shape[0], images_BHWC.shape[-1]
    crop_height, crop_width = crop_hw
    padded = jnp.pad(images_BHWC.astype(jnp.float32),
                     ((0, 0), (0, crop_height), (0, crop_width), (0, 0)))
    crop = jax.vmap(lambda image, x, y: jax.lax.dynamic_slice(
        image, (y, x, 0), (crop_height, crop_width, channels)))
    level_image = crop(padded, box_xy_B2[:, 0], box_xy_B2[:, 1])  # each face's box at (0, 0)
    # Chip pixel (x, y) reads level pixel affine @ (x, y, 1): elementwise, as a matmul could run
    # in reduced precision on a GPU (TF32).
    ys, xs = jnp.meshgrid(jnp.arange(size, dtype=jnp.float32),
                          jnp.arange(size, dtype=jnp.float32), indexing="ij")
    a = affine_B23[:, None, None, :, :]  # (B, 1, 1, 2, 3)
    where_BHW2 = a[..., 0] * xs[..., None] + a[..., 1] * ys[..., None] + a[..., 2]
    # dlib reads a pixel only when its whole 2x2 neighbourhood lies in the (level's) box.
    corner_BHW2 = jnp.floor(where_BHW2)
    inside_BHW = jnp.all((corner_BHW2 >= 0) & (corner_BHW2 + 1 < level_wh_B2[:, None, None, :]),
                         axis=-1)
    chips_BHWC = jnp.zeros((batch, size, size, images_BHWC.shape[-1]), jnp.float32)
    for level in range(levels + 1):
        if level:
            level_image = pyramid_down(level_image)
        level_height, level_width = level_image.shape[1:3]
        grid_BHW2 = where_BHW2 / jnp.array([level_width - 1, level_height - 1]) * 2 - 1
        sampled = grid_sample(level_image, grid_BHW2, padding_mode="zeros", align_corners=True)
        chips_BHWC = jnp.where((level_B == level)[:, None, None, None], sampled, chips_BHWC)
    # Truncated like dlib's cast to uint8. dlib interpolates in double precision and often lands
    # exactly on a whole number (flat regions); float32 lands up to ~1e-5 below it. A slack of
    # 2e-5 leaves ~0.01% of chip values one level off on the shared samples (none: 0.4%; 1e-3:
    # 0.1%, all one up); errors cost ~5e-5 each in descriptor distance.
    chips_BHWC = jnp.floor(chips_BHWC + ROUNDING_SLACK) * inside_BHW[..., None]
    return jnp.clip(chips_BHWC, 0, 255).astype(jnp.uint8)


def extract_chips(images_BHW3, landmarks_BNx2, size=CHIP_SIZE, padding=CHIP_PADDING):
    """dlib's face chips (B, size, size, 3) uint8 of one face per image, from N = 68 or 5
    landmarks (dlib's ``get_face_chip(image, shape, size, padding)``)."""
    landmarks_BNx2 = np.asarray(landmarks_BNx2, np.float64)
    if len(landmarks_BNx2) != len(images_BHW3) or not np.isfinite(landmarks_BNx2).all():
        raise ValueError(f"extract_chips wants finite landmarks for each of the "
                         f"{len(images_BHW3)} images; got {landmarks_BNx2.shape} "
                         f"({np.isnan(landmarks_BNx2).any(axis=(1, 2)).sum()} with NaN)")
    images_BHW3 = jnp.asarray(images_BHW3)
    height, width = images_BHW3.shape[1:3]
    plans = [chip_plan(np.asarray(marks), height, width, size, padding)
             for marks in landmarks_BNx2]
    stack = lambda key, dtype: jnp.asarray(np.stack([plan[key] for plan in plans]), dtype)
    # The boxes are cut out at one size (rounded up, to compile for few sizes): the pyramid
    # then costs the face's area, not the frame's.
    box_hw = np.max([plan["box_wh"][::-1] for plan in plans], axis=0)
    crop_hw = tuple(int(v) for v in np.minimum(-(-box_hw // CROP_STEP) * CROP_STEP,
                                               (height, width)))
    return _extract(images_BHW3, stack("box_xy", jnp.int32), stack("level", jnp.int32),
                    stack("level_wh", jnp.int32), stack("affine_23", jnp.float32),
                    levels=max(plan["level"] for plan in plans), size=size, crop_hw=crop_hw)
