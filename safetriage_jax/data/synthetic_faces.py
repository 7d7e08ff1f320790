"""Procedural synthetic talking faces: the embedded default dataset (no download needed).

Identity (looks) and motion (pose, blinks, smile, speech, a one-sided droop) are separate inputs,
so ``render(id_b, motion_a)`` is the ground truth for transferring A's motion onto B, and
``landmarks`` says where the drawn features are. Pure numpy: anti-aliased implicit shapes are
composited back to front over a static background. "Left" always means image left (smaller x).
"""

import numpy as np

LANDMARK_NAMES = (
    "left_brow_outer", "left_brow_inner", "right_brow_inner", "right_brow_outer",
    "left_eye_outer", "left_eye_top", "left_eye_inner", "left_eye_bottom", "left_pupil",
    "right_eye_inner", "right_eye_top", "right_eye_outer", "right_eye_bottom", "right_pupil",
    "nose_bridge", "nose_tip", "left_nostril", "right_nostril",
    "mouth_left_corner", "upper_lip_top", "mouth_right_corner", "upper_lip_bottom",
    "lower_lip_top", "lower_lip_bottom", "left_jaw", "chin", "right_jaw",
)
NUM_LANDMARKS = len(LANDMARK_NAMES)
MOTION_KEYS = ("roll", "yaw", "pitch", "translate_x", "translate_y", "scale", "blink_left",
               "blink_right", "smile", "jaw_open", "brow_raise", "droop")

_HEAD_Y, _ZOOM = -0.07, 1.15  # head centre (image y) at rest; image units per head unit at scale 1
_WARP_R = (0.8, 0.95)    # half-extents of the yaw (x) and pitch (y) warps, in head units
_SKIN = np.float32([[250, 217, 194], [235, 184, 148], [194, 138, 97], [133, 87, 56],
                    [82, 54, 36]]) / 255  # light .. dark, interpolated
_HAIR = np.float32([[18, 15, 13], [61, 38, 20], [122, 79, 41], [219, 179, 107], [153, 64, 26],
                    [184, 184, 184]]) / 255
_IRIS = np.float32([[82, 48, 20], [66, 117, 184], [77, 133, 77], [115, 120, 133],
                    [133, 102, 46]]) / 255
_WHITE, _DARK = np.float32([0.96, 0.95, 0.93]), np.float32([0.08, 0.05, 0.05])
_MOUTH, _TEETH = np.float32([0.30, 0.07, 0.08]), np.float32([0.96, 0.94, 0.88])


def sample_identity(rng: np.random.Generator) -> dict:
    """Random looks: colours as (3,) float32 arrays in [0, 1], background blobs as (4, ...)
    arrays, geometry as floats in head units (the head is about 0.8 wide, 1.1 tall)."""
    def uni(low, high):
        return float(rng.uniform(low, high))

    def pick(table):
        return np.clip(table[rng.integers(len(table))] * rng.uniform(0.85, 1.15, 3), 0, 1)

    tone = uni(0, len(_SKIN) - 1.001)
    skin = _SKIN[int(tone)] + tone % 1 * (_SKIN[int(tone) + 1] - _SKIN[int(tone)])
    eye_y, eye_gap, eye_up = uni(-0.04, 0.02), uni(0.14, 0.18), uni(0.035, 0.05)
    look = dict(
        skin=skin * rng.uniform(0.95, 1.05, 3), hair=pick(_HAIR), iris=pick(_IRIS),
        clothes=rng.uniform(0.1, 0.9, 3), bg_a=rng.uniform(0.2, 0.95, 3),
        bg_b=rng.uniform(0.2, 0.95, 3), bg_angle=uni(0, 2 * np.pi),
        blob_xy=rng.uniform(-1.1, 1.1, (4, 2)), blob_r=rng.uniform(0.15, 0.5, 4),
        blob_rgb=rng.uniform(0.1, 0.95, (4, 3)), stripe_amp=uni(0, 0.07) * (rng.random() < 0.4),
        stripe_freq=uni(8, 25), stripe_angle=uni(0, np.pi),
        head_x=uni(-0.03, 0.03), head_y=uni(-0.03, 0.03), head_w=uni(0.36, 0.43),
        head_top=uni(0.52, 0.58), head_bottom=uni(0.5, 0.58), head_power=uni(2.0, 2.4),
        jaw_power=uni(1.7, 2.6), ear_size=uni(0.85, 1.15),
        hair_volume=uni(1.05, 1.18), hair_length=uni(0.05, 0.95), hairline=uni(-0.42, -0.27),
        hair_dip=uni(0.22, 0.38), hair_part=uni(-0.1, 0.1), hair_wave=uni(0, 0.03),
        hair_freq=uni(8, 25), hair_phase=uni(0, 2 * np.pi),
        eye_y=eye_y, eye_gap=eye_gap, eye_w=uni(0.065, 0.085), eye_up=eye_up,
        eye_down=uni(0.022, 0.032), eye_tilt=uni(-0.008, 0.015), iris_r=uni(0.036, 0.046),
        brow_x=eye_gap + uni(-0.01, 0.015), brow_y=eye_y - eye_up - uni(0.035, 0.06),
        brow_len=uni(0.07, 0.095), brow_thick=uni(0.008, 0.016), brow_arch=uni(0.005, 0.025),
        brow_tilt=uni(-0.01, 0.015), nose_y=uni(0.13, 0.19), nose_w=uni(0.035, 0.05),
        mouth_y=uni(0.28, 0.34), mouth_w=uni(0.09, 0.13), lip_up=uni(0.015, 0.025),
        lip_down=uni(0.02, 0.032), blush=uni(0, 0.3))
    look["lips"] = np.clip(look["skin"] * np.float32([0.85, 0.5, 0.52]) + uni(0.0, 0.12), 0, 1)
    return {key: np.asarray(value, np.float32) if isinstance(value, np.ndarray) else float(value)
            for key, value in look.items()}


def _smooth(rng, t_T, low=0.008, high=0.045):
    """Sum of three random sinusoids (cycles/frame in [low, high]), bounded in [-1, 1]."""
    freq, phase = rng.uniform(low, high, 3), rng.uniform(0, 2 * np.pi, 3)
    weight = rng.uniform(0.3, 1, 3)
    return (weight / weight.sum()) @ np.sin(2 * np.pi * freq[:, None] * t_T + phase[:, None])


def _blinks(rng, num_frames, blink_rate):
    """Short blink events (about one per 35 frames at rate 1): 0 open .. 1 closed."""
    closed_T, t = np.zeros(num_frames), -6.0
    while blink_rate > 0 and (t := t + rng.exponential(35 / blink_rate)) < num_frames + 6:
        bump = 1.3 * np.exp(-0.5 * ((np.arange(num_frames) - t) / rng.uniform(1.2, 2.2)) ** 2)
        closed_T = np.maximum(closed_T, np.clip(bump, 0, 1))
    return closed_T


def sample_motion(rng: np.random.Generator, num_frames: int, *, asymmetry: float = 0.0,
                  blink_rate: float = 1.0) -> dict:
    """Smooth random motion, each ``MOTION_KEYS`` value (num_frames,) float32 (angles in radians).

    ``asymmetry`` in [0, 1] is a left-side droop (mouth corner sags, eyelid half lowered, weaker
    smile and blink there); ``blink_rate`` scales how often blinks happen (0 = never).
    """
    if not isinstance(num_frames, (int, np.integer)) or num_frames < 1:
        raise ValueError(f"num_frames must be an integer >= 1, got {num_frames!r}")
    if not 0.0 <= asymmetry <= 1.0:
        raise ValueError(f"asymmetry must be in [0, 1], got {asymmetry!r}")
    if not blink_rate >= 0.0:
        raise ValueError(f"blink_rate must be >= 0, got {blink_rate!r}")
    t_T = np.arange(num_frames, dtype=np.float64)
    motion = {"roll": 0.2 * _smooth(rng, t_T), "yaw": 0.45 * _smooth(rng, t_T),
              "pitch": 0.15 * _smooth(rng, t_T), "translate_x": 0.07 * _smooth(rng, t_T),
              "translate_y": 0.05 * _smooth(rng, t_T), "scale": 1 + 0.07 * _smooth(rng, t_T),
              "smile": np.clip(0.3 + 0.9 * _smooth(rng, t_T), 0, 1),
              "brow_raise": np.clip(0.2 + 0.9 * _smooth(rng, t_T), 0, 1)}
    talking = np.clip(0.5 + 1.2 * _smooth(rng, t_T), 0, 1)
    syllables = 0.5 - 0.5 * np.cos(2 * np.pi * rng.uniform(0.1, 0.2) * t_T + rng.uniform(0, 6.3)
                                   + 2 * _smooth(rng, t_T))
    motion["jaw_open"] = talking * syllables
    motion["blink_left"] = motion["blink_right"] = _blinks(rng, num_frames, blink_rate)
    motion["droop"] = np.full(num_frames, asymmetry)
    return {key: np.asarray(motion[key], np.float32).copy() for key in MOTION_KEYS}


def motion_slice(motion, frames) -> dict:
    """The motion at ``frames`` (an index, slice or index array) for every key."""
    return {key: np.atleast_1d(np.asarray(value)[frames]) for key, value in motion.items()}


def _num_frames(motion):
    """T, once ``motion`` is checked to hold every key, all of one shape (T,) with T >= 1."""
    if missing := [key for key in MOTION_KEYS if key not in motion]:
        raise ValueError(f"motion is missing keys {missing}; expected {MOTION_KEYS}")
    shapes = {np.shape(motion[key]) for key in MOTION_KEYS}
    if len(shapes) != 1 or len(shape := next(iter(shapes))) != 1 or shape[0] < 1:
        raise ValueError(f"motion values must all have the same shape (T,), T >= 1; got {shapes}")
    return shape[0]


def _rig(look, motion):
    """Per-frame pose and feature parameters in head coordinates, shared by render and landmarks:
    (T,) arrays, or (T, 2) for [left, right] pairs. The droop weakens the left side here."""
    m = {key: np.asarray(motion[key], np.float32) for key in MOTION_KEYS}
    droop = m["droop"]

    def pair(left, right):
        return np.stack(np.broadcast_arrays(left, right), 1)

    blink_left = 0.35 * droop + (1 - 0.35 * droop) * (1 - 0.5 * droop) * m["blink_left"]
    smile = m["smile"][:, None] * pair(1 - 0.8 * droop, 1.0)
    opening = 0.09 * m["jaw_open"]
    rig = {"cx": look["head_x"] + m["translate_x"],
           "cy": _HEAD_Y + look["head_y"] + m["translate_y"],
           "scale": _ZOOM * m["scale"], "cos": np.cos(m["roll"]), "sin": np.sin(m["roll"]),
           "k_u": 0.45 * np.sin(m["yaw"]), "k_v": 0.4 * np.sin(m["pitch"]),
           "nose_u": 0.07 * np.sin(m["yaw"]), "nose_v": 0.04 * np.sin(m["pitch"]),
           "eye_close": pair(blink_left, m["blink_right"]),
           "brow_v": look["brow_y"] - 0.04 * m["brow_raise"],
           "mouth_hw": look["mouth_w"] * (1 + 0.15 * smile),
           "corner_v": look["mouth_y"] - 0.045 * smile + 0.05 * pair(droop, 0.0),
           "opening": opening, "chin_v": look["head_bottom"] + 0.6 * opening}
    return {key: np.asarray(value, np.float32) for key, value in rig.items()}


def _warp(p, k, radius, inverse=False):
    """Yaw/pitch approximation along one axis: inside |p| < radius features shift by k * radius
    at the centre and the far side compresses; the ends stay put (monotone for |k| < 0.5).
    ``inverse`` undoes it exactly (the stable root of the quadratic)."""
    w = p / radius
    if inverse:
        moved = 2 * radius * (w - k) / (1 + np.sqrt(np.maximum(1 - 4 * k * (w - k), 0)))
    else:
        moved = p + k * radius * (1 - w * w)
    return np.where(np.abs(w) < 1, moved, p)


def landmarks(identity, motion) -> np.ndarray:
    """(T, L, 2) float32 landmark (x, y) in the rendered frames, -1/1 at the corner pixel centres
    (x right, y down), whatever the size; ``LANDMARK_NAMES`` names them."""
    num_frames, look, r = _num_frames(motion), identity, _rig(identity, motion)
    es, ew, ey, et = look["eye_gap"], look["eye_w"], look["eye_y"], look["eye_tilt"]
    eye_top = ey - look["eye_up"] + r["eye_close"] * (look["eye_up"] + look["eye_down"])
    eye_bottom = ey + look["eye_down"]
    bx, bl, bt, bv = look["brow_x"], look["brow_len"], look["brow_tilt"], r["brow_v"]
    nu, nv, nw = r["nose_u"], look["nose_y"] + r["nose_v"], look["nose_w"]
    my, mw, cv, op = look["mouth_y"], r["mouth_hw"], r["corner_v"], r["opening"]
    p = look["jaw_power"]
    jaw_u = look["head_w"] * (1 - (my / r["chin_v"]) ** p) ** (1 / p)  # head outline at my
    points = [(-bx - bl, bv + bt), (bl - bx, bv - bt), (bx - bl, bv - bt), (bx + bl, bv + bt),
              (-es - ew, ey - et), (-es, eye_top[:, 0]), (ew - es, ey + et), (-es, eye_bottom),
              (-es, ey), (es - ew, ey + et), (es, eye_top[:, 1]), (es + ew, ey - et),
              (es, eye_bottom), (es, ey),
              (0.3 * nu, ey), (nu, nv), (nu - 0.45 * nw, nv + 0.3 * nw),
              (nu + 0.45 * nw, nv + 0.3 * nw),
              (-mw[:, 0], cv[:, 0]), (0, my - 0.15 * op - 0.65 * look["lip_up"]),
              (mw[:, 1], cv[:, 1]), (0, my - 0.15 * op), (0, my + 0.85 * op),
              (0, my + 0.85 * op + look["lip_down"]), (-jaw_u, my), (0, r["chin_v"]), (jaw_u, my)]
    u_TL, v_TL = (np.stack([np.broadcast_to(np.float32(point[axis]), (num_frames,))
                            for point in points], 1) for axis in (0, 1))
    col = {key: value[:, None] for key, value in r.items() if value.ndim == 1}
    u_TL, v_TL = _warp(u_TL, col["k_u"], _WARP_R[0]), _warp(v_TL, col["k_v"], _WARP_R[1])
    x_TL = col["cx"] + col["scale"] * (col["cos"] * u_TL - col["sin"] * v_TL)
    y_TL = col["cy"] + col["scale"] * (col["sin"] * u_TL + col["cos"] * v_TL)
    return np.stack([x_TL, y_TL], -1).astype(np.float32)


def _per_pixel(f_THW):
    """How much f changes per pixel step (its gradient's size). Each axis takes the larger
    one-sided difference, so ridges and creases (like |x| at 0) keep their slope."""
    dx, dy = np.abs(np.diff(f_THW, axis=2)), np.abs(np.diff(f_THW, axis=1))
    gx_THW, gy_THW = np.zeros_like(f_THW), np.zeros_like(f_THW)
    gx_THW[:, :, :-1], gy_THW[:, :-1] = dx, dy
    np.maximum(gx_THW[:, :, 1:], dx, out=gx_THW[:, :, 1:])
    np.maximum(gy_THW[:, 1:], dy, out=gy_THW[:, 1:])
    return np.sqrt(gx_THW * gx_THW + gy_THW * gy_THW) + 1e-12


def _cov(f_THW):
    """Anti-aliased coverage of the region {f < 0}: f / per-pixel change is a distance in pixels."""
    return np.clip(0.5 - f_THW / _per_pixel(f_THW), 0, 1)


def _band(centre_THW, half_width):
    """Coverage of {|centre| < half_width} (a stroke; a disc if centre is a radius). Under a pixel
    wide it is drawn a pixel wide but fainter, so thin features move without flickering."""
    per_px = _per_pixel(centre_THW)
    width_px = np.maximum(half_width / per_px, 0)
    drawn_px = np.maximum(width_px, 0.5)
    return np.clip(drawn_px + 0.5 - np.abs(centre_THW) / per_px, 0, 1) * (width_px / drawn_px)


def _paint(img_3THW, coverage_THW, rgb):
    """Composite a colour, (3,) or per pixel (3, T, H, W), over the channel-first image."""
    delta_3THW = (rgb if np.ndim(rgb) == 4 else np.reshape(rgb, (3, 1, 1, 1))) - img_3THW
    delta_3THW *= coverage_THW
    img_3THW += delta_3THW


def _blob(u, v, a, b_top, b_bottom, p_top=2.0, p_bottom=2.0):
    """Superellipse radius - 1 (< 0 inside), upper and lower halves with their own height/power."""
    below, f32 = v > 0, np.float32
    p, b = np.where(below, f32(p_bottom), f32(p_top)), np.where(below, f32(b_bottom), f32(b_top))
    return ((np.abs(u) / a) ** p + (np.abs(v) / b) ** p) ** (1 / p) - 1


class _Chunk:
    """A few frames' pixel grid in head coordinates ``u``, ``v`` (T, H, W: the inverse of the
    pose) and body coordinates ``ub`` (T, 1, W), ``vb`` (T, H, 1) (translation and scale only)."""

    def __init__(self, rig, grid_W):
        self.rig = rig
        dx = (grid_W[None, None, :] - self.col("cx")) / self.col("scale")
        dy = (grid_W[None, :, None] - self.col("cy")) / self.col("scale")
        cos, sin = self.col("cos"), self.col("sin")
        self.u = _warp(cos * dx + sin * dy, self.col("k_u"), _WARP_R[0], inverse=True)
        self.v = _warp(cos * dy - sin * dx, self.col("k_v"), _WARP_R[1], inverse=True)
        self.ub, self.vb, self.left = dx, dy, self.u < 0

    def col(self, key):
        """A per-frame value as (T, 1, 1)."""
        return self.rig[key][:, None, None]

    def side(self, key):
        """A [left, right] per-frame value, per pixel by the side of the face (T, H, W)."""
        return np.where(self.left, self.rig[key][:, 0, None, None], self.rig[key][:, 1, None, None])


def _background(look, grid_W):
    """(H, W, 3) static background: two-colour gradient, soft colour blobs, optional stripes."""
    x, y = grid_W[None, :, None], grid_W[:, None, None]
    along = np.cos(look["bg_angle"]) * x + np.sin(look["bg_angle"]) * y
    img = look["bg_a"] + (0.5 + 0.35 * along) * (look["bg_b"] - look["bg_a"])
    for (bx, by), radius, rgb in zip(look["blob_xy"], look["blob_r"], look["blob_rgb"]):
        weight = 0.55 * np.exp(-((x - bx) ** 2 + (y - by) ** 2) / (2 * radius ** 2))
        img = img + weight * (rgb - img)
    across = np.cos(look["stripe_angle"]) * x + np.sin(look["stripe_angle"]) * y
    return img * (1 + look["stripe_amp"] * np.sin(look["stripe_freq"] * across))


def _draw_body(img, look, c):
    """Back hair (head frame), then neck and torso (body frame); returns the back-hair shape."""
    u, v, ub, vb, a = c.u, c.v, c.ub, c.vb, look["head_w"]
    vol = look["hair_volume"]
    back = _blob(u, v + 0.02, a * vol, look["head_top"] * vol + 0.03, look["hair_length"], 2, 4)
    _paint(img, _cov(back), look["hair"] * 0.85)
    neck_w = 0.42 * a
    neck = np.maximum(np.abs(ub) - neck_w, np.maximum(-vb, vb - 1.0))
    _paint(img, _cov(neck), look["skin"] * 0.78)
    neckline = 1 - (ub / (1.5 * neck_w)) ** 2 - ((vb - 0.72) / 0.1) ** 2
    torso = np.maximum(_blob(ub, vb - 1.14, 0.66, 0.42, 0.5, 2.6, 2.6), neckline)
    shade = 1 - 0.3 * np.clip(vb - 0.72, 0, 1)
    _paint(img, _cov(torso), look["clothes"][:, None, None, None] * shade)
    return back


def _draw_face(img, look, c):
    """Ears, the shaded head whose chin drops as the jaw opens, and cheek blush."""
    u, v, au, a, size = c.u, c.v, np.abs(c.u), look["head_w"], look["ear_size"]
    ear_u, ear_v = a - 0.015, look["eye_y"] + 0.05
    ear = ((au - ear_u) / (0.055 * size)) ** 2 + ((v - ear_v) / (0.095 * size)) ** 2 - 1
    _paint(img, _cov(ear), look["skin"] * 0.92)
    inner = ((au - ear_u - 0.012) / (0.028 * size)) ** 2 + ((v - ear_v) / (0.06 * size)) ** 2 - 1
    _paint(img, 0.7 * _cov(inner), look["skin"] * 0.75)
    head = _blob(u, v, a, look["head_top"], c.col("chin_v"), look["head_power"], look["jaw_power"])
    shade = 1 - 0.2 * np.clip((head + 0.35) / 0.35, 0, 1) - 0.06 * (u + v)  # rim, light top-left
    _paint(img, _cov(head), look["skin"][:, None, None, None] * shade)
    cheek = (au - look["eye_gap"] - 0.02) ** 2 + (v - look["mouth_y"] + 0.1) ** 2
    _paint(img, look["blush"] * np.exp(-cheek / 0.003), np.float32([0.92, 0.42, 0.42]))


def _draw_eyes(img, look, c):
    """Brows, then each eye: white, iris, pupil, glint, between lids that close on blink."""
    v, au, ew, ey, iris_r = c.v, np.abs(c.u), look["eye_w"], look["eye_y"], look["iris_r"]
    s = (au - look["brow_x"]) / look["brow_len"]  # -1 inner end .. 1 outer end
    centre = c.col("brow_v") - look["brow_arch"] * (1 - s * s) + look["brow_tilt"] * s
    brow = _band(v - centre, look["brow_thick"] * (1 - 0.35 * s))
    _paint(img, brow * _cov((np.abs(s) - 1) * look["brow_len"]), look["hair"] * 0.7)
    s = (au - look["eye_gap"]) / ew
    g = np.sqrt(np.clip(1 - s * s, 0, 1))
    v0 = ey - look["eye_tilt"] * s
    bottom, top_open = v0 + look["eye_down"] * g, v0 - look["eye_up"] * g
    top = top_open + c.side("eye_close") * (look["eye_up"] + look["eye_down"]) * g
    crease = _band(v - top_open + 0.018, 0.004) * _cov((np.abs(s) - 0.8) * ew)
    _paint(img, 0.4 * crease, look["skin"] * 0.7)
    eye = _band(v - (top + bottom) / 2, (bottom - top) / 2 - 0.003) * _cov((np.abs(s) - 1) * ew)
    _paint(img, eye, _WHITE)
    dist = np.sqrt((au - look["eye_gap"]) ** 2 + (v - ey) ** 2)
    _paint(img, eye * _band(dist, iris_r), look["iris"])
    _paint(img, eye * _band(dist, 0.45 * iris_r), _DARK)
    glint = np.sqrt((au - look["eye_gap"] - 0.3 * iris_r) ** 2 + (v - ey + 0.35 * iris_r) ** 2)
    _paint(img, eye * _band(glint, 0.22 * iris_r), _WHITE)
    lash = _band(v - top + 0.006, 0.006) * _cov((np.abs(s) - 1.05) * ew)
    _paint(img, lash, _DARK)


def _draw_nose(img, look, c):
    """Bridge shadow, tip and nostrils; the tip sticks out, so it turns further with yaw/pitch."""
    u, v, skin = c.u, c.v, look["skin"]
    nu, ny, nw = c.col("nose_u"), look["nose_y"] + c.col("nose_v"), look["nose_w"]
    top_v, bottom_v = look["eye_y"] + 0.04, ny - 0.2 * nw
    t = np.clip((v - top_v) / (bottom_v - top_v), 0, 1)
    line_u = 0.3 * nu - 0.4 * nw + t * (0.7 * nu - 0.4 * nw)
    bridge = _band(u - line_u, 0.006) * _cov(np.maximum(top_v - v, v - bottom_v))
    _paint(img, 0.45 * bridge, skin * 0.8)
    tip = np.sqrt(((u - nu) / nw) ** 2 + ((v - ny - 0.2 * nw) / (0.5 * nw)) ** 2)
    _paint(img, 0.6 * _band(tip, 1.0), skin * 0.85)  # radii in units of the ellipse's
    nostril = np.sqrt(((np.abs(u - nu) - 0.45 * nw) / (0.25 * nw)) ** 2
                      + ((v - ny - 0.3 * nw) / (0.14 * nw)) ** 2)
    _paint(img, _band(nostril, 1.0), skin * 0.35)


def _draw_mouth(img, look, c):
    """Lips between corners that rise with smile (sag with droop), opening onto teeth."""
    u, v, half_w = c.u, c.v, c.side("mouth_hw")
    s2 = (u / half_w) ** 2
    g2 = np.clip(1 - s2, 0, 1)
    centre = look["mouth_y"] + (c.side("corner_v") - look["mouth_y"]) * s2
    top, bottom = centre - 0.15 * c.col("opening") * g2, centre + 0.85 * c.col("opening") * g2
    g, ends = g2 ** 0.3, (np.sqrt(s2) - 1) * half_w  # lips stay full nearly to the corners
    upper = top - look["lip_up"] * g * (1 - 0.35 * np.exp(-s2 / 0.03))  # with a cupid's bow
    lower = bottom + look["lip_down"] * g
    lips = _band(v - (upper + lower) / 2, (lower - upper) / 2 + 0.002) * _cov(ends)
    _paint(img, lips, look["lips"])
    inside = _band(v - (top + bottom) / 2, (bottom - top) / 2 + 0.004) * _cov(ends + 0.08 * half_w)
    _paint(img, inside, _MOUTH)
    teeth = _band(v - top - 0.2 * (bottom - top), 0.2 * (bottom - top) - 0.0015)
    _paint(img, teeth * _cov(ends + 0.25 * half_w), _TEETH)


def _draw_hair(img, look, c, back):
    """Front hair: inside the back-hair outline, above a wavy parted hairline clear of the eyes."""
    u, v = c.u, c.v
    line = (look["hairline"] + look["hair_dip"] * ((u - look["hair_part"]) / look["head_w"]) ** 2
            + look["hair_wave"] * np.sin(look["hair_freq"] * u + look["hair_phase"]))
    beside_eyes = np.maximum(np.abs(u) - look["eye_gap"] - look["eye_w"] - 0.03, 0)
    line = np.minimum(line, np.minimum(look["brow_y"] - 0.07 + 2 * beside_eyes,
                                       look["eye_y"] + 0.1))
    _paint(img, _cov(np.maximum(back, 4 * (v - line))), look["hair"])


def render(identity, motion, size: int) -> np.ndarray:
    """(T, size, size, 3) uint8 RGB frames of ``identity`` making ``motion``."""
    if not isinstance(size, (int, np.integer)) or size < 16:
        raise ValueError(f"size must be an integer >= 16, got {size!r}")
    num_frames, rig = _num_frames(motion), _rig(identity, motion)
    grid_W = np.linspace(-1, 1, size, dtype=np.float32)  # pixel centres, -1 and 1 at the corners
    background_3HW = np.moveaxis(_background(identity, grid_W), -1, 0).astype(np.float32)
    frames_THW3 = np.empty((num_frames, size, size, 3), np.uint8)
    step = max(1, 2 ** 18 // size ** 2)  # frames drawn at once: about 256k pixels
    for start in range(0, num_frames, step):
        chunk = _Chunk({key: value[start:start + step] for key, value in rig.items()}, grid_W)
        img_3THW = np.repeat(background_3HW[:, None], len(chunk.u), 1)
        back = _draw_body(img_3THW, identity, chunk)
        for draw in (_draw_face, _draw_eyes, _draw_nose, _draw_mouth):
            draw(img_3THW, identity, chunk)
        _draw_hair(img_3THW, identity, chunk, back)
        img_3THW = np.clip(img_3THW * 255 + 0.5, 0, 255)  # rounds when cast to uint8
        frames_THW3[start:start + step] = np.moveaxis(img_3THW, 0, -1)
    return frames_THW3
