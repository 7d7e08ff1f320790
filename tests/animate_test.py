"""Video I/O and the batched animate pipeline, end to end on the shared samples (mostly with the
TINY model: the ported fixture's outputs are checked against upstream in porting_test)."""

import fractions

import numpy as np
import pytest

from conftest import SAMPLES, TINY
from safetriage_jax import cli
from safetriage_jax.animate import animate_video
from safetriage_jax.errors import SafeTriageError
from safetriage_jax.video import VideoReader, read_image, video_writer


@pytest.fixture(scope="module")
def short_clip(tmp_path_factory):
    """The first 11 frames of the shared driving video, as an mp4 at 25 fps."""
    path = tmp_path_factory.mktemp("clips") / "short.mp4"
    with VideoReader(SAMPLES / "driving.mp4") as reader:
        frames = [frame for _, frame in zip(range(11), reader)]
        height, width = frames[0].shape[:2]
        with video_writer(path, reader.fps, width - width % 2, height - height % 2) as write:
            write([f[: height - height % 2, : width - width % 2] for f in frames])
    return path


def test_reads_the_shared_samples():
    assert read_image(SAMPLES / "source.png").shape == (676, 680, 3)
    with VideoReader(SAMPLES / "driving.mp4") as reader:
        assert reader.fps == 25
        frames = list(reader)
    assert len(frames) == 169 and frames[0].shape == (412, 410, 3) and frames[0].dtype == np.uint8


@pytest.mark.parametrize("mode,batch", [("relative", 4), ("standard", 16), ("avd", 11)])
def test_animate_writes_every_frame_at_the_driving_fps(tmp_path, short_clip, tiny_model_dir,
                                                       mode, batch):
    out = tmp_path / "out.mp4"
    count = animate_video(tiny_model_dir, SAMPLES / "source.png", short_clip, out, mode=mode,
                          batch_size=batch, progress=False)
    assert count == 11
    with VideoReader(out) as reader:
        frames = np.stack(list(reader))
        assert reader.fps == fractions.Fraction(25)
    assert frames.shape == (11, TINY.image_size, TINY.image_size, 3)
    assert frames.std() > 10  # an image, not a blank frame
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]  # no temp files left behind


def test_batch_size_does_not_change_the_result(tmp_path, short_clip, fixture_model_dir):
    """On the 256 px fixture: on the 64 px TINY model the mean difference was 1.47 levels."""
    outs = []
    for batch in (3, 11):
        out = tmp_path / f"b{batch}.mp4"
        animate_video(fixture_model_dir, SAMPLES / "source.png", short_clip, out,
                      batch_size=batch, progress=False)
        with VideoReader(out) as reader:
            outs.append(np.stack(list(reader)).astype(np.int16))
    assert np.abs(outs[0] - outs[1]).mean() < 1.0  # equal up to float reassociation + h264


def test_corrupt_and_empty_videos_fail_cleanly(tmp_path, tiny_model_dir, capsys):
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes((SAMPLES / "driving.mp4").read_bytes()[:3000])
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00" * 5000)
    audio_only = tmp_path / "audio.mp4"
    _write_silence(audio_only)
    for video in (corrupt, garbage, audio_only, tmp_path / "missing.mp4"):
        out = tmp_path / "out.mp4"
        code = cli.main(["animate", "--checkpoint", str(tiny_model_dir), "--source",
                         str(SAMPLES / "source.png"), "--driving", str(video), "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2, video
        assert err.startswith("error: ") and "Traceback" not in err, err
        assert not out.exists() and not list(tmp_path.glob("*partial*")), video


def _write_silence(path):
    import av
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp",
                                           layout="mono")
        frame.sample_rate = 16000
        for packet in stream.encode(frame):
            container.mux(packet)
        container.mux(stream.encode(None))


def test_bad_source_and_model_fail_cleanly(tmp_path, short_clip, tiny_model_dir, capsys):
    not_image = tmp_path / "face.png"
    not_image.write_text("hello")
    tiny = tmp_path / "tiny.png"
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tiny)
    cases = [
        (["--checkpoint", str(tmp_path / "nope"), "--source", str(SAMPLES / "source.png")],
         "does not exist"),
        (["--checkpoint", str(tiny_model_dir), "--source", str(not_image)], "as an image"),
        (["--checkpoint", str(tiny_model_dir), "--source", str(tiny)], "at least 32x32"),
        (["--checkpoint", str(tiny_model_dir), "--source", str(SAMPLES / "source.png"),
          "--batch", "0"], "--batch"),
    ]
    for args, message in cases:
        code = cli.main(["animate", *args, "--driving", str(short_clip),
                         "--out", str(tmp_path / "o.mp4")])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, (args, err)
    assert not (tmp_path / "o.mp4").exists()


def test_writer_leaves_nothing_when_interrupted_or_empty(tmp_path):
    out = tmp_path / "x.mp4"
    with pytest.raises(RuntimeError):
        with video_writer(out, 25, 64, 64) as write:
            write(np.zeros((2, 64, 64, 3), np.uint8))
            raise RuntimeError("boom")
    with pytest.raises(SafeTriageError, match="No frames"):
        with video_writer(out, 25, 64, 64):
            pass
    assert list(tmp_path.iterdir()) == []


def test_missing_avd_weights_are_reported(tiny_variables):
    from safetriage_jax.animate import Animator
    variables = {k: dict(v) for k, v in tiny_variables.items()}
    for collection in variables.values():
        collection.pop("avd_network", None)
    with pytest.raises(SafeTriageError, match="no AVD network"):
        Animator(TINY, variables, mode="avd")


def test_relative_mode_moves_source_keypoints_by_the_scaled_driving_motion():
    from safetriage_jax.animate import hull_area, relative_keypoints
    square = np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5], [0.0, 0.0]])
    assert hull_area(square) == pytest.approx(1.0)
    assert hull_area(np.zeros((5, 2))) == 0.0  # degenerate: no error
    kp_source = np.array([[[0.1, 0.2], [0.3, -0.4]]])
    kp_initial = np.array([[[0.0, 0.0], [0.5, 0.5]]])
    assert np.allclose(relative_keypoints(kp_source, kp_initial, kp_initial, 2.0), kp_source)
    moved = relative_keypoints(kp_source, kp_initial + 0.1, kp_initial, 2.0)
    assert np.allclose(moved, kp_source + 0.2)
