"""Crop squares sized from the 68 landmarks: an open mouth keeps the chin under the pasted face."""

import numpy as np
import pytest

from conftest import SAMPLES
from safetriage_jax.deid.faces import FaceTracker, box_area
from safetriage_jax.deid.framing import (BLANK, FramingOptions, face_boxes, plan_crops,
                                         uncovered_frames)
from safetriage_jax.deid.landmarks import INNER_LIPS_BOTTOM, INNER_LIPS_TOP
from safetriage_jax.video import VideoReader


@pytest.fixture(scope="module")
def driving_track():
    """dlib's track of the whole shared driving video (169 frames; the mouth opens wide around
    frames 30-48 and 105-108, where the detector's box lost the chin)."""
    with VideoReader(SAMPLES / "driving.mp4") as reader:
        return FaceTracker().track(reader, reader.fps)


def _mouth_opening(landmarks_T68x2):
    """Inner-lip gap over the landmarks' height."""
    lips_T = landmarks_T68x2[:, INNER_LIPS_BOTTOM, 1] - landmarks_T68x2[:, INNER_LIPS_TOP, 1]
    gap_T = lips_T.mean(1)
    return gap_T / np.ptp(landmarks_T68x2[..., 1], axis=1)


def test_an_open_mouth_stays_inside_the_landmark_sized_crop(driving_track):
    marks_T68x2 = driving_track.landmarks_T68x2[25:50]
    fps = driving_track.fps
    opening_T = _mouth_opening(driving_track.landmarks_T68x2)
    assert opening_T[25:50].max() > max(0.06, 2 * np.median(opening_T))  # real, wide open
    plan = plan_crops(face_boxes(marks_T68x2), fps)
    assert not uncovered_frames(plan, marks_T68x2).any()
    # The detector's box drops the chin out of the same crop scale (what blanked these frames).
    by_box = plan_crops(driving_track.boxes_T4[25:50], fps, FramingOptions(hold_seconds=0))
    assert uncovered_frames(by_box, marks_T68x2).sum() >= 5


def test_face_boxes_are_dlib_sized_squares_around_the_landmarks(driving_track):
    boxes_T4 = face_boxes(driving_track.landmarks_T68x2)
    side_T = boxes_T4[:, 2] - boxes_T4[:, 0]
    np.testing.assert_allclose(boxes_T4[:, 3] - boxes_T4[:, 1], side_T)
    ratio_T = side_T / np.sqrt(box_area(driving_track.boxes_T4))
    assert 0.95 < np.median(ratio_T) < 1.05  # the crop scale keeps its meaning
    low_T2, high_T2 = driving_track.landmarks_T68x2.min(1), driving_track.landmarks_T68x2.max(1)
    assert (boxes_T4[:, :2] <= low_T2).all() and (boxes_T4[:, 2:] >= high_T2).all()
    missing = np.full((1, 68, 2), np.nan)
    assert np.isnan(face_boxes(missing)).all()


def test_the_crop_side_holds_through_a_mouth_opening(driving_track):
    """Held at the largest face side within half a second, the crop barely zooms while the
    mouth opens and closes; the detector's boxes jitter far more."""
    plan = plan_crops(face_boxes(driving_track.landmarks_T68x2), driving_track.fps)
    by_box = plan_crops(driving_track.boxes_T4, driving_track.fps, FramingOptions(hold_seconds=0))
    change = np.abs(np.diff(plan.sides_T)).mean() / plan.sides_T.mean()
    change_by_box = np.abs(np.diff(by_box.sides_T)).mean() / by_box.sides_T.mean()
    assert change < 0.5 * change_by_box


def test_paste_back_blanks_at_most_two_frames_of_the_driving_video(driving_track):
    """What `deid --paste-back` blanks on the shared driving video: frames without a face
    nearby in time, and frames whose pasted square would leave part of the face showing
    (19 of 169 when the square followed the detector's box)."""
    plan = plan_crops(face_boxes(driving_track.landmarks_T68x2), driving_track.fps)
    plan.status_T[uncovered_frames(plan, driving_track.landmarks_T68x2)] = BLANK
    assert driving_track.num_frames == 169 and plan.counts()["blank"] <= 2
    # with twice the margin around the outline, still (nearly) every frame is covered
    wider = FramingOptions(cover_margin=0.2)
    assert uncovered_frames(plan, driving_track.landmarks_T68x2, wider).sum() <= 2
