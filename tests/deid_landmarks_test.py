"""Landmark measurements: invariances, symmetry, signs and the frames they pick."""

import numpy as np
import pytest

from conftest import SAMPLES
from safetriage_jax.deid import landmarks
from safetriage_jax.deid.faces import FaceTracker
from safetriage_jax.video import VideoReader

# iBUG 300-W left/right correspondence: MIRROR[i] is the point mirroring point i.
MIRROR = np.array([*range(16, -1, -1), *range(26, 16, -1), 27, 28, 29, 30, 35, 34, 33, 32, 31,
                   45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40, 54, 53, 52, 51, 50, 49, 48,
                   59, 58, 57, 56, 55, 64, 63, 62, 61, 60, 67, 66, 65])


@pytest.fixture(scope="module")
def faces_T68x2():
    """dlib's landmarks on the first frames of the shared driving video, in pixels."""
    with VideoReader(SAMPLES / "driving.mp4") as reader:
        frames = [frame for _, frame in zip(range(6), reader)]
    return FaceTracker().track(frames, 25).landmarks_T68x2


def _similarity(rng, points_N68x2):
    angle, scale = rng.uniform(-np.pi, np.pi), rng.uniform(0.2, 5.0)
    rotation_22 = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return scale * points_N68x2 @ rotation_22.T + rng.uniform(-500, 500, 2)


def _symmetric(points_68x2):
    """The face averaged with its mirror image: symmetric about the vertical through the eyes."""
    face_68x2 = landmarks.normalise(points_68x2)
    return (face_68x2 + face_68x2[MIRROR] * np.array([-1.0, 1.0])) / 2


def test_mirror_table_is_an_involution_on_the_face():
    np.testing.assert_array_equal(MIRROR[MIRROR], np.arange(68))
    assert sorted(MIRROR) == list(range(68))


def test_measurements_ignore_position_size_and_roll(rng, faces_T68x2):
    points_T68x2 = faces_T68x2 + rng.normal(0, 3.0, faces_T68x2.shape)  # fresh random faces
    moved_T68x2 = _similarity(rng, points_T68x2)
    face_T68x2 = landmarks.normalise(points_T68x2)
    np.testing.assert_allclose(landmarks.normalise(moved_T68x2), face_T68x2, atol=1e-9)
    np.testing.assert_allclose(landmarks.normalise(points_T68x2[2]), face_T68x2[2], atol=1e-12)
    left, right = landmarks.eye_centres(face_T68x2)
    np.testing.assert_allclose(left + right, 0, atol=1e-12)  # origin between the eyes
    np.testing.assert_allclose(right - left, np.tile([1.0, 0.0], (len(left), 1)), atol=1e-12)
    for name, value in landmarks.asymmetry(moved_T68x2).items():
        np.testing.assert_allclose(value, landmarks.asymmetry(points_T68x2)[name], atol=1e-9)
    np.testing.assert_allclose(landmarks.mouth_opening(moved_T68x2),
                               landmarks.mouth_opening(points_T68x2), rtol=1e-9)
    eye = landmarks.EYE_IMAGE_LEFT
    np.testing.assert_allclose(landmarks.eye_aspect_ratio(moved_T68x2, eye),
                               landmarks.eye_aspect_ratio(points_T68x2, eye), rtol=1e-9)


def test_a_symmetric_face_has_no_asymmetry(rng, faces_T68x2):
    symmetric_68x2 = _symmetric(faces_T68x2[int(rng.integers(len(faces_T68x2)))])
    for points_68x2 in (symmetric_68x2, _similarity(rng, symmetric_68x2)):
        for name, value in landmarks.asymmetry(points_68x2).items():
            assert abs(value) < 1e-9, name
    real = landmarks.asymmetry(faces_T68x2)
    assert any(np.abs(v).max() > 1e-3 for v in real.values())  # the real face is not symmetric


@pytest.mark.parametrize("corner, sign", [(landmarks.MOUTH_CORNER_IMAGE_LEFT, 1),
                                          (landmarks.MOUTH_CORNER_IMAGE_RIGHT, -1)])
def test_the_mouth_corner_index_follows_the_lowered_corner(rng, faces_T68x2, corner, sign):
    drooped_68x2 = _symmetric(faces_T68x2[0])
    drooped_68x2[corner, 1] += 0.1  # y points down: this corner sags by 0.1 inter-ocular distances
    index = landmarks.asymmetry(_similarity(rng, drooped_68x2))
    assert index["mouth_corner"] == pytest.approx(sign * 0.1)
    assert np.sign(index["nasolabial"]) == sign  # the sagging corner is farther from its nostril
    assert abs(index["eye_opening"]) < 1e-9 and abs(index["brow"]) < 1e-9


def test_eye_opening_falls_as_the_lids_close(faces_T68x2):
    face_68x2 = landmarks.normalise(faces_T68x2[0])
    for eye in (landmarks.EYE_IMAGE_LEFT, landmarks.EYE_IMAGE_RIGHT):
        upper, lower = eye[[1, 2]], eye[[5, 4]]
        ratios = []
        for closure in (0.0, 0.5, 0.9):
            points_68x2 = face_68x2.copy()
            points_68x2[upper] += closure * (face_68x2[lower] - face_68x2[upper])
            ratios.append(landmarks.eye_aspect_ratio(points_68x2, eye))
        assert 0.15 < ratios[0] < 0.45  # an open eye
        assert ratios[0] > ratios[1] > ratios[2] and ratios[2] < 0.05
        assert ratios[1] == pytest.approx(ratios[0] / 2)


def test_neutral_frame_prefers_a_closed_mouth_and_skips_missing_frames(faces_T68x2):
    face_68x2 = landmarks.normalise(faces_T68x2[0])
    shut_68x2, open_68x2 = face_68x2.copy(), face_68x2.copy()
    shut_68x2[landmarks.INNER_LIPS_BOTTOM] = shut_68x2[landmarks.INNER_LIPS_TOP]
    open_68x2[landmarks.INNER_LIPS_BOTTOM, 1] += 0.4
    assert landmarks.mouth_opening(shut_68x2) == 0 < landmarks.mouth_opening(open_68x2)
    assert landmarks.neutral_frame(np.stack([open_68x2, shut_68x2, open_68x2])) == 1
    missing_68x2 = np.full_like(face_68x2, np.nan)
    assert landmarks.neutral_frame(np.stack([missing_68x2, open_68x2, shut_68x2])) == 2
    assert landmarks.closest_frame(np.stack([open_68x2, missing_68x2, shut_68x2]), shut_68x2) == 2
