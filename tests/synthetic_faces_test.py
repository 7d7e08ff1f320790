"""The procedural talking-face renderer: shapes, determinism, identity/motion separation, and that
the ground-truth landmarks sit on what is drawn."""

import numpy as np
import pytest

from safetriage_jax.data import synthetic_faces as sf


def still(num_frames=1, **values):
    """A neutral motion (no pose change, eyes open, mouth closed) with some keys overridden."""
    motion = {key: np.zeros(num_frames, np.float32) for key in sf.MOTION_KEYS}
    motion["scale"][:] = 1
    for key, value in values.items():
        motion[key] = np.broadcast_to(np.asarray(value, np.float32), (num_frames,)).copy()
    return motion


def to_pixels(points, size):
    return (points + 1) / 2 * (size - 1)


def fit_similarity(src_L2, dst_L2):
    """Least-squares dst = a * src + b in complex numbers: (rotation angle, scale, residual)."""
    src, dst = src_L2 @ [1, 1j], dst_L2 @ [1, 1j]
    design = np.stack([src, np.ones_like(src)], 1)
    (a, b), *_ = np.linalg.lstsq(design, dst, rcond=None)
    return np.angle(a), np.abs(a), np.abs(design @ [a, b] - dst).max()


def test_shapes_dtypes_and_names():
    identity = sf.sample_identity(np.random.default_rng(0))
    motion = sf.sample_motion(np.random.default_rng(1), 5)
    assert set(motion) == set(sf.MOTION_KEYS)
    assert all(v.shape == (5,) and v.dtype == np.float32 for v in motion.values())
    assert len(sf.LANDMARK_NAMES) == len(set(sf.LANDMARK_NAMES)) == sf.NUM_LANDMARKS
    frames = sf.render(identity, motion, 48)
    assert frames.shape == (5, 48, 48, 3) and frames.dtype == np.uint8
    points = sf.landmarks(identity, motion)
    assert points.shape == (5, sf.NUM_LANDMARKS, 2) and points.dtype == np.float32
    assert sf.render(identity, sf.motion_slice(motion, [2]), 48).shape == (1, 48, 48, 3)


def test_deterministic_per_seed():
    def make(seed):
        identity = sf.sample_identity(np.random.default_rng(seed))
        motion = sf.sample_motion(np.random.default_rng(seed), 4, asymmetry=0.5)
        return identity, motion, sf.render(identity, motion, 32)

    (id_a, motion_a, frames_a), (id_b, motion_b, frames_b) = make(7), make(7)
    assert id_a.keys() == id_b.keys() and all(np.array_equal(id_a[k], id_b[k]) for k in id_a)
    assert all(np.array_equal(motion_a[k], motion_b[k]) for k in sf.MOTION_KEYS)
    np.testing.assert_array_equal(frames_a, frames_b)
    assert not np.array_equal(frames_a, make(8)[2])


def test_identities_differ_but_share_the_motion(rng):
    """Two people, one pose-only motion: different pixels, and each person's landmarks are that
    person's rest landmarks moved by the same similarity transform (the motion's roll and scale)."""
    id_a, id_b = sf.sample_identity(rng), sf.sample_identity(rng)
    t = np.linspace(0, 1, 6)
    motion = still(6, roll=0.3 * t - 0.15, scale=0.9 + 0.2 * t, translate_x=0.05 - 0.1 * t,
                   translate_y=0.04 * t)
    assert np.abs(sf.render(id_a, motion, 32).astype(int) - sf.render(id_b, motion, 32)).mean() > 5
    for identity in (id_a, id_b):
        rest, moved = sf.landmarks(identity, still())[0], sf.landmarks(identity, motion)
        for frame in range(6):
            angle, scale, residual = fit_similarity(rest, moved[frame])
            assert angle == pytest.approx(motion["roll"][frame], abs=1e-4)
            assert scale == pytest.approx(motion["scale"][frame], abs=1e-4)
            assert residual < 1e-4
    assert np.abs(sf.landmarks(id_a, motion) - sf.landmarks(id_b, motion)).max() > 0.01


def test_motion_changes_frames_and_landmarks(rng):
    identity = sf.sample_identity(rng)
    motion = sf.sample_motion(rng, 12)
    frames, points = sf.render(identity, motion, 32), sf.landmarks(identity, motion)
    assert np.abs(frames[0].astype(int) - frames[-1]).mean() > 1
    assert np.abs(points[0] - points[-1]).max() > 0.01
    assert np.abs(points).max() <= 1


@pytest.mark.parametrize("seed", range(4))
def test_landmarks_stay_inside_the_frame(seed):
    rng = np.random.default_rng(seed)
    for _ in range(5):
        motion = sf.sample_motion(rng, 200, asymmetry=rng.uniform(), blink_rate=3)
        assert np.abs(sf.landmarks(sf.sample_identity(rng), motion)).max() < 0.98


def test_blink_closes_the_eye(rng):
    """With blink 1 the eye region takes the colour of the skin just below the eye."""
    identity = sf.sample_identity(rng)
    motion = still(2, blink_right=[0, 1])
    frames = sf.render(identity, motion, 256).astype(float)
    points = to_pixels(sf.landmarks(identity, motion), 256)
    index = {name: k for k, name in enumerate(sf.LANDMARK_NAMES)}
    x0, x1 = points[0, index["right_eye_inner"], 0], points[0, index["right_eye_outer"], 0]
    # rows between the open upper lid and the closed lid's lash line; the cheek patch is below
    top = int(points[0, index["right_eye_top"], 1]) + 2
    bottom = int(points[0, index["right_eye_bottom"], 1]) - 2
    eye, cheek = (np.s_[y0:y0 + bottom - top, int(x0) + 3:int(x1) - 2] for y0 in (top, bottom + 8))
    open_gap, closed_gap = (np.abs(f[eye].mean((0, 1)) - f[cheek].mean((0, 1))).max()
                            for f in frames)
    assert closed_gap < 0.3 * open_gap
    assert points[1, index["right_eye_top"], 1] > points[0, index["right_eye_top"], 1] + 3
    left_top = points[:, index["left_eye_top"]]
    np.testing.assert_array_equal(left_top[0], left_top[1])


def test_asymmetry_lowers_the_left_mouth_corner(rng):
    left, right = (sf.LANDMARK_NAMES.index(f"mouth_{side}_corner") for side in ("left", "right"))
    identity = sf.sample_identity(rng)
    for asymmetry in (0.0, 1.0):
        motion = sf.sample_motion(rng, 20, asymmetry=asymmetry)
        motion["roll"][:] = 0
        points = sf.landmarks(identity, motion)
        sag = points[:, left, 1] - points[:, right, 1]
        if asymmetry:
            assert (sag > 0.03).all()
        else:
            np.testing.assert_allclose(sag, 0, atol=1e-6)


def test_mouth_corner_landmarks_are_at_the_drawn_mouth(rng):
    """Green lips: the lips' horizontal extent ends at the corner landmarks (within 2 px at 128)."""
    identity = dict(sf.sample_identity(rng), lips=np.float32([0, 1, 0]))
    motion = still(5, smile=[0, 1, 0.5, 0, 1], jaw_open=[0, 0.5, 1, 0.2, 0],
                   yaw=[0, 0.3, -0.3, 0, 0.1], droop=[0, 0, 0, 1, 1], pitch=[0, 0, 0.1, -0.1, 0])
    frames = sf.render(identity, motion, 128).astype(int)
    points = to_pixels(sf.landmarks(identity, motion), 128)
    index = [sf.LANDMARK_NAMES.index(name) for name in
             ("mouth_left_corner", "mouth_right_corner", "upper_lip_top", "lower_lip_bottom")]
    for frame, (left, right, top, bottom) in zip(frames, points[:, index]):
        x0, y0 = int(left[0]) - 3, int(min(top[1], left[1], right[1])) - 3
        box = frame[y0:int(bottom[1]) + 4, x0:int(right[0]) + 4]
        ys, xs = np.nonzero(box[..., 1] - box[..., [0, 2]].max(-1) > 60)
        xs, ys = xs + x0, ys + y0
        assert abs(xs.min() - left[0]) <= 2 and abs(xs.max() - right[0]) <= 2
        for end, corner in ((xs <= xs.min() + 1, left), (xs >= xs.max() - 1, right)):
            assert ys[end].min() - 1.5 <= corner[1] <= ys[end].max() + 1.5


def test_pupil_landmarks_are_on_the_pupils(rng):
    identity = sf.sample_identity(rng)
    motion = sf.sample_motion(rng, 6, blink_rate=0)
    frames = sf.render(identity, motion, 256)
    points = np.round(to_pixels(sf.landmarks(identity, motion), 256)).astype(int)
    for name in ("left_pupil", "right_pupil"):
        x, y = points[:, sf.LANDMARK_NAMES.index(name)].T
        assert frames[np.arange(6), y, x].max() < 60


def test_background_corners_do_not_move_with_the_head(rng):
    identity = sf.sample_identity(rng)
    motion = still(4, roll=[0, 0.2, -0.2, 0.1], yaw=[0, 0.45, -0.45, 0.2],
                   scale=[1, 1.07, 0.93, 1.07], translate_x=[0, 0.07, -0.07, 0.07],
                   translate_y=[0, 0.05, -0.05, 0.05], pitch=[0, 0.15, -0.15, 0.1])
    frames = sf.render(identity, motion, 64)
    for corner in (np.s_[:3, :3], np.s_[:3, -3:], np.s_[-3:, :3], np.s_[-3:, -3:]):
        assert (frames[(slice(None), *corner)] == frames[(slice(0, 1), *corner)]).all()
    assert np.abs(frames[1:].astype(int) - frames[:1]).max() > 100


def test_subpixel_motion_changes_pixels_a_little(rng):
    """Anti-aliased edges: a tenth of a pixel of head motion changes frames a little, smoothly."""
    identity = sf.sample_identity(rng)
    frames = sf.render(identity, still(2, translate_x=[0, 0.2 / 63]), 64).astype(int)
    change = np.abs(frames[1] - frames[0])
    assert 0 < change.max() <= 64 and change.mean() < 2


def test_blink_rate_and_droop():
    rng = np.random.default_rng(3)
    never = sf.sample_motion(rng, 300, blink_rate=0)
    assert never["blink_left"].max() == 0 and never["blink_right"].max() == 0
    often = sf.sample_motion(rng, 300, blink_rate=2, asymmetry=0.4)
    assert often["blink_left"].max() == 1 and often["blink_left"].min() == 0
    assert np.all(often["droop"] == np.float32(0.4))
    smooth = sf.sample_motion(rng, 300)
    assert np.abs(np.diff(smooth["yaw"])).max() < 0.1 and np.ptp(smooth["yaw"]) > 0.05


@pytest.mark.parametrize("call,match", [
    (lambda i, m: sf.render(i, m, 8), "size"),
    (lambda i, m: sf.sample_motion(np.random.default_rng(0), 0), "num_frames"),
    (lambda i, m: sf.sample_motion(np.random.default_rng(0), 3, asymmetry=1.5), "asymmetry"),
    (lambda i, m: sf.sample_motion(np.random.default_rng(0), 3, blink_rate=-1), "blink_rate"),
    (lambda i, m: sf.render(i, {k: v for k, v in m.items() if k != "yaw"}, 32), "missing"),
    (lambda i, m: sf.landmarks(i, dict(m, smile=np.zeros(2))), "same shape"),
])
def test_bad_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call(sf.sample_identity(np.random.default_rng(0)), still(3))
