"""evaluate-deid and its baselines, on short clips cut from the shared samples."""

import json

import numpy as np
import pytest
from PIL import Image

from conftest import SAMPLES
from safetriage_jax.deid import baselines
from safetriage_jax.deid.evaluation import evaluate_deid
from safetriage_jax.deid.faces import crop_square
from safetriage_jax.errors import SafeTriageError
from safetriage_jax.outputs import OutputExistsError
from safetriage_jax.video import VideoReader, read_image, video_writer

FRAMES, STRIDE = 12, 14  # spread over driving.mp4: more motion than landmark jitter
FACE_BOX = np.array([85.0, 136.0, 317.0, 368.0])  # dlib's box in driving.mp4's first frame


def _write(path, frames_NHW3):
    with video_writer(path, 25, frames_NHW3[0].shape[1], frames_NHW3[0].shape[0]) as write:
        write(frames_NHW3)
    return path


@pytest.fixture(scope="module")
def frames():
    with VideoReader(SAMPLES / "driving.mp4") as reader:
        return [frame for index, frame in enumerate(reader) if index % STRIDE == 0][:FRAMES]


@pytest.fixture(scope="module")
def clip(tmp_path_factory, frames):
    return _write(tmp_path_factory.mktemp("eval") / "clip.mp4", frames)


@pytest.fixture(scope="module")
def itself(tmp_path_factory, clip):
    """The clip evaluated against itself, with all baselines and the identity in the gallery."""
    report = tmp_path_factory.mktemp("self") / "report"
    return evaluate_deid(clip, clip, report, identity_path=SAMPLES / "source.png",
                         progress=False), report


def test_the_original_against_itself_is_identified_and_keeps_all_motion(itself):
    metrics, _ = itself
    assert metrics["frames"] == FRAMES and metrics["original_face_frames"] == FRAMES
    assert metrics["gallery"] == ["original", "identity"]
    same = metrics["methods"]["deid"]
    assert same["privacy"]["detected_share"] == 1.0 and same["privacy"]["reid_rate"] == 1.0
    assert same["privacy"]["top1_rate"] == 1.0 and same["privacy"]["mean_distance"] < 1e-6
    assert same["motion"]["landmark_frames"] == 1.0
    assert same["motion"]["landmark_correlation"] > 0.95 and same["motion"]["nme"] < 1e-9
    assert all(r > 0.95 for r in same["motion"]["region_correlation"].values())
    assert same["motion"]["blink_r"] > 0.95 and same["motion"]["mouth_r"] > 0.95
    for index in same["asymmetry"].values():
        assert index["ccc"] > 0.95 and index["mean_abs_diff"] < 1e-9


def test_baselines_hide_the_face_and_lose_the_landmarks(itself):
    metrics, _ = itself
    methods = metrics["methods"]
    assert list(methods) == ["deid", "blur", "pixelate", "mask"]
    mask = methods["mask"]
    assert mask["privacy"]["detected_share"] == 0 and mask["privacy"]["reid_rate"] == 0
    assert mask["motion"]["landmark_frames"] == 0 and mask["motion"]["landmark_correlation"] is None
    assert all(i["ccc"] is None and i["mean_offset"] is None for i in mask["asymmetry"].values())
    identical = methods["deid"]["motion"]["landmark_correlation"]
    for name in ("blur", "pixelate"):
        correlation = methods[name]["motion"]["landmark_correlation"]
        assert correlation is None or correlation < identical
        assert methods[name]["privacy"]["reid_rate"] < 0.5
        assert methods[name]["privacy"]["embedded_share"] == 1.0  # the attacker's fallback


def test_the_report_is_written_and_parses(itself):
    metrics, report = itself
    assert {"metrics.json", "report.html", "tracks.png", "asymmetry.png", "frames.png",
            "privacy_utility.png", ".safetriage-output"} == {p.name for p in report.iterdir()}
    saved = json.loads((report / "metrics.json").read_text())
    assert saved["methods"]["mask"]["motion"]["nme"] is None
    assert saved["methods"]["deid"] == json.loads(json.dumps(metrics["methods"]["deid"]))
    assert len(saved["series"]["original"]["asymmetry_mouth_corner"]) == FRAMES
    assert saved["series"]["mask"]["asymmetry_brow"] == [None] * FRAMES
    assert "blink" in metrics["series"]["deid"]  # plot-only series stay in memory
    page = (report / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "pixelate" in page


def test_a_rerun_replaces_its_own_report_only_when_asked(tmp_path, clip):
    report = tmp_path / "report"
    evaluate_deid(clip, clip, report, baselines=(), max_frames=2, progress=False)
    with pytest.raises(OutputExistsError):
        evaluate_deid(clip, clip, report, baselines=(), max_frames=3, progress=False)
    evaluate_deid(clip, clip, report, baselines=(), max_frames=3, overwrite=True, progress=False)
    assert json.loads((report / "metrics.json").read_text())["frames"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    (report / "notes.txt").write_text("the clinician's own file")
    with pytest.raises(SafeTriageError, match="not a folder this tool wrote"):
        evaluate_deid(clip, clip, report, baselines=(), max_frames=2, overwrite=True,
                      progress=False)
    assert (report / "notes.txt").is_file()


def test_another_person_is_not_reidentified(tmp_path, clip):
    portrait = np.asarray(Image.fromarray(read_image(SAMPLES / "source.png")).resize((410, 412)))
    other = _write(tmp_path / "other.mp4", [np.roll(portrait, 3 * i, axis=1) for i in range(10)])
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(gallery / "grey.png")
    (gallery / "notes.txt").write_text("not an image")
    metrics = evaluate_deid(clip, other, tmp_path / "r", identity_path=SAMPLES / "source.png",
                            gallery_dir=gallery, baselines=(), progress=False)
    privacy = metrics["methods"]["deid"]["privacy"]
    assert privacy["detected_share"] == 1.0
    assert privacy["reid_rate"] == 0 and privacy["mean_distance"] > 0.6
    assert privacy["top1_rate"] == 0 and privacy["mean_rank"] == 2 and privacy["gallery_size"] == 2
    assert metrics["frames"] == 10 and any("differ in length" in n for n in metrics["notes"])
    assert any("grey.png shows no face" in n for n in metrics["notes"])


def test_a_face_crop_of_another_size_keeps_the_motion(tmp_path, frames, clip):
    center = (FACE_BOX[:2] + FACE_BOX[2:]) / 2
    crops = [crop_square(f, center, 1.5 * (FACE_BOX[2] - FACE_BOX[0]), 256)[0] for f in frames]
    metrics = evaluate_deid(clip, _write(tmp_path / "crop.mp4", crops), tmp_path / "r",
                            baselines=(), progress=False)
    method = metrics["methods"]["deid"]
    assert method["privacy"]["reid_rate"] > 0.9  # the same person, only cropped
    motion = method["motion"]
    assert motion["landmark_frames"] == 1.0 and motion["nme"] < 0.05
    # dlib's landmarks jitter with resampling, so even a plain crop does not reach 1.
    assert motion["landmark_correlation"] > 0.7 and motion["mouth_r"] > 0.8


def test_a_mild_blur_keeps_less_motion_than_the_video_itself(tmp_path, frames, clip, itself):
    blurred = [baselines.blur(f, FACE_BOX, sigma_fraction=1 / 100) for f in frames]
    metrics = evaluate_deid(clip, _write(tmp_path / "mild.mp4", blurred), tmp_path / "r",
                            baselines=(), progress=False)
    assert metrics["methods"]["deid"]["privacy"]["reid_rate"] > 0.9  # a mild blur hides nobody
    motion = metrics["methods"]["deid"]["motion"]
    assert motion["landmark_frames"] > 0.5
    identical = itself[0]["methods"]["deid"]["motion"]["landmark_correlation"]
    assert motion["landmark_correlation"] < identical
    assert motion["nme"] > 0


def test_user_errors_say_what_to_fix(tmp_path, clip):
    black = _write(tmp_path / "black.mp4", [np.zeros((96, 96, 3), np.uint8)] * 3)
    with pytest.raises(SafeTriageError, match="No face found in the original"):
        evaluate_deid(black, clip, tmp_path / "r", baselines=(), progress=False)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "blank.png")
    with pytest.raises(SafeTriageError, match="No face found in the identity image"):
        evaluate_deid(clip, clip, tmp_path / "r", identity_path=tmp_path / "blank.png")
    with pytest.raises(SafeTriageError, match="not a directory"):
        evaluate_deid(clip, clip, tmp_path / "r", gallery_dir=tmp_path / "blank.png")
    with pytest.raises(SafeTriageError, match="Unknown baseline"):
        evaluate_deid(clip, clip, tmp_path / "r", baselines=("smudge",))
    with pytest.raises(SafeTriageError, match="does not exist"):
        evaluate_deid(tmp_path / "missing.mp4", clip, tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_baselines_change_only_the_face_region_and_black_out_faceless_frames(rng):
    frame = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    box = np.array([60.0, 40.0, 100.0, 80.0])  # enlarged 1.3x: x 54..106, y 34..86
    outside = np.ones(frame.shape[:2], bool)
    outside[34:86, 54:106] = False
    for name, treat in baselines.BASELINES.items():
        out = treat(frame, box)
        assert out.shape == frame.shape and out.dtype == np.uint8
        np.testing.assert_array_equal(out[outside], frame[outside], err_msg=name)
        assert np.abs(out[40:80, 60:100].astype(int) - frame[40:80, 60:100]).mean() > 20, name
        assert not treat(frame, None).any() and not treat(frame, np.full(4, np.nan)).any()
    assert not baselines.mask(frame, box)[34:86, 54:106].any()
    cells = baselines.pixelate(frame, box)[34:86, 54:106].reshape(-1, 3)
    assert len(np.unique(cells, axis=0)) <= 64
