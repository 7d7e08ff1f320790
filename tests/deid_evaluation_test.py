"""evaluate-deid and the landmark measurements it is built on, on the shared samples."""

import json

import numpy as np
import pytest
from PIL import Image

from conftest import SAMPLES
from safetriage_jax import cli
from safetriage_jax.deid import landmarks
from safetriage_jax.deid.evaluation import evaluate_deid
from safetriage_jax.deid.faces import FaceTracker
from safetriage_jax.errors import SafeTriageError
from safetriage_jax.video import VideoReader, read_image, video_writer

FRAMES = 10
# iBUG 300-W left/right correspondence: MIRROR[i] is the point mirroring point i.
MIRROR = np.array([*range(16, -1, -1), *range(26, 16, -1), 27, 28, 29, 30, 35, 34, 33, 32, 31,
                   45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40, 54, 53, 52, 51, 50, 49, 48,
                   59, 58, 57, 56, 55, 64, 63, 62, 61, 60, 67, 66, 65])


def _write(path, frames):
    with video_writer(path, 25, frames[0].shape[1], frames[0].shape[0]) as write:
        write(frames)
    return path


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    with VideoReader(SAMPLES / "driving.mp4") as reader:
        frames = [f for _, f in zip(range(FRAMES), reader)]
    return _write(tmp_path_factory.mktemp("eval") / "clip.mp4", frames)


@pytest.fixture(scope="module")
def face_points():
    with VideoReader(SAMPLES / "driving.mp4") as reader:
        frames = [f for _, f in zip(range(30), reader)]
    return FaceTracker().track(frames, 25).landmarks_T68x2


def test_the_original_against_itself_is_fully_identifiable_and_useful(tmp_path, clip):
    report = tmp_path / "report"
    metrics = evaluate_deid(clip, clip, report, identity_path=SAMPLES / "source.png",
                            progress=False)
    same = metrics["methods"]["deid"]
    assert same["privacy"]["reid_rate"] == 1.0 and same["privacy"]["top1_rate"] == 1.0
    assert same["motion"]["landmark_correlation"] > 0.95 and same["motion"]["nme"] < 0.05
    assert all(a["ccc"] > 0.95 for a in same["asymmetry"].values())
    masked = metrics["methods"]["mask"]
    assert masked["privacy"]["detected_share"] == 0 and masked["motion"]["landmark_correlation"] is None
    assert masked["privacy"]["reid_rate"] < 0.5
    for name in ("blur", "pixelate"):
        correlation = metrics["methods"][name]["motion"]["landmark_correlation"]
        assert correlation is None or correlation < same["motion"]["landmark_correlation"]
    assert json.loads((report / "metrics.json").read_text())["frames"] == FRAMES
    page = (report / "report.html").read_text()
    assert "data:image/png;base64" in page and "pixelate" in page
    assert {"tracks.png", "asymmetry.png", "frames.png", "privacy_utility.png"} <= {
        p.name for p in report.iterdir()}
    assert not [p for p in report.iterdir() if p.name.startswith(".partial")]


def test_another_person_is_not_reidentified(tmp_path, clip, capsys):
    portrait = np.asarray(Image.fromarray(read_image(SAMPLES / "source.png")).resize((410, 412)))
    other = _write(tmp_path / "other.mp4", [np.roll(portrait, 3 * i, axis=1) for i in range(FRAMES)])
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    Image.fromarray(portrait).save(gallery / "someone.png")
    (gallery / "notes.txt").write_text("not a face")
    argv = ["evaluate-deid", "--original", str(clip), "--deid", str(other), "--report",
            str(tmp_path / "r"), "--gallery", str(gallery), "--baselines", ""]
    assert cli.main(argv) == 0
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    privacy = metrics["methods"]["deid"]["privacy"]
    assert privacy["reid_rate"] == 0 and privacy["mean_distance"] > 0.6
    assert privacy["top1_rate"] == 0 and privacy["gallery_size"] == 2
    assert list(metrics["methods"]) == ["deid"]
    assert "re-id rate" in capsys.readouterr().out


def test_no_face_in_the_original_is_an_error(tmp_path, clip):
    black = _write(tmp_path / "black.mp4", [np.zeros((96, 96, 3), np.uint8)] * 3)
    with pytest.raises(SafeTriageError, match="No face found in the original"):
        evaluate_deid(black, clip, tmp_path / "r", progress=False)
    with pytest.raises(SafeTriageError, match="Unknown baseline"):
        evaluate_deid(clip, clip, tmp_path / "r", baselines=("smudge",), progress=False)
    assert not (tmp_path / "r").exists()


def _similarity(rng, points):
    angle, scale = rng.uniform(-0.6, 0.6), rng.uniform(0.3, 3.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return scale * points @ rotation.T + rng.uniform(-200, 200, 2)


def test_normalised_landmarks_ignore_position_size_and_roll(rng, face_points):
    points = face_points[int(rng.integers(0, len(face_points)))]
    np.testing.assert_allclose(landmarks.normalise(_similarity(rng, points)),
                               landmarks.normalise(points), atol=1e-9)
    for name, value in landmarks.asymmetry(_similarity(rng, points)).items():
        np.testing.assert_allclose(value, landmarks.asymmetry(points)[name], atol=1e-9)


def test_asymmetry_is_zero_for_a_symmetric_face_and_signed_by_the_lowered_corner(face_points):
    face = landmarks.normalise(face_points[0])
    mirrored = face[MIRROR] * np.array([-1, 1])
    symmetric = (face + mirrored) / 2
    for name, value in landmarks.asymmetry(symmetric).items():
        assert abs(value) < 1e-9, name
    drooped = symmetric.copy()
    drooped[landmarks.MOUTH_CORNER_IMAGE_LEFT, 1] += 0.1  # y down: the image-left corner sags
    assert landmarks.asymmetry(drooped)["mouth_corner"] == pytest.approx(0.1)
    assert landmarks.asymmetry(drooped)["nasolabial"] > 0


def test_eye_opening_falls_when_the_lids_close_and_neutral_frame_prefers_a_closed_mouth(face_points):
    face = landmarks.normalise(face_points[0])
    closed = face.copy()
    eye = landmarks.EYE_IMAGE_LEFT
    closed[eye[[1, 2]], 1] = closed[eye[[5, 4]], 1]  # upper lid onto the lower lid
    assert landmarks.eye_aspect_ratio(closed, eye) < 0.05 < landmarks.eye_aspect_ratio(face, eye)
    open_mouth, shut = face.copy(), face.copy()
    shut[landmarks.INNER_LIPS_BOTTOM] = shut[landmarks.INNER_LIPS_TOP]
    open_mouth[landmarks.INNER_LIPS_BOTTOM, 1] += 0.4
    assert landmarks.neutral_frame(np.stack([open_mouth, shut, open_mouth])) == 1
    assert landmarks.neutral_frame(np.stack([np.full_like(face, np.nan), shut])) == 1
