"""No data loss, no identity leak, no silent wrong result: each defect of issue 13, one test."""

import dataclasses
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from conftest import FIXTURE, ROOT, SAMPLES
from safetriage_jax import cli
from safetriage_jax import model_dir as model_dirs
from safetriage_jax.config_loader import load_python_config
from safetriage_jax.deid.evaluation import Analysis, masked
from safetriage_jax.deid.framing import BLANK, FACE, FILLED, CropPlan, FramingOptions, uncovered_frames
from safetriage_jax.errors import SafeTriageError
from safetriage_jax.models.config import load_model_config
from safetriage_jax.parity import read_inputs
from safetriage_jax.video import VideoReader, read_image


def _run(capsys, *argv):
    """(exit code, stderr) of the CLI; an error is one `error:` line without a traceback."""
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    if code == 2 and err.startswith("error:"):
        assert err.count("\n") == 1 and "Traceback" not in err, err
    return code, err


def _face_landmarks(center, half):
    """A 68-point stand-in: points on a circle of radius ``half`` around ``center``."""
    angles = np.linspace(0, 2 * np.pi, 68, endpoint=False)
    return np.asarray(center) + half * np.stack([np.cos(angles), np.sin(angles)], -1)


def test_crop_options_out_of_range_are_refused(capsys):
    for scale in (-1, 0, 0.8, 100):
        with pytest.raises(SafeTriageError, match="scale must be between"):
            FramingOptions(scale=scale)
        code, err = _run(capsys, "deid", "--input", "a.mp4", "--identity", "b.png", "--out",
                         "c.mp4", "--crop-scale", scale)
        assert code == 2 and "--crop-scale" in err
    for flag, value in (("--batch", 0), ("--batch", "1e9"), ("--stride", 0), ("--max-frames", -3)):
        command = "evaluate-deid" if flag != "--batch" else "animate"
        code, err = _run(capsys, command, flag, value)
        assert code == 2 and flag in err, err
    code, err = _run(capsys, "parity", "--checkpoint", "x", "--inputs", "i", "--out", "o",
                     "--tolerance", "-1")
    assert code == 2 and "--tolerance" in err


def test_paste_back_that_would_not_cover_the_face_is_refused_per_frame():
    marks_T68x2 = np.stack([_face_landmarks((100, 100), 40)] * 3 + [np.full((68, 2), np.nan)]
                           + [_face_landmarks((150, 100), 40)])
    plan = CropPlan(centers_T2=np.array([[100, 100]] * 5, float),
                    sides_T=np.array([200, 80, 200, 200, 200], float),
                    status_T=np.array([FACE, FACE, BLANK, FILLED, FACE]))
    uncovered_T = uncovered_frames(plan, marks_T68x2, FramingOptions())
    # frame 1's square is smaller than the face; the FILLED frame 3 is judged by its detected
    # neighbours (frame 2's face fits, frame 4's face sits too far right for the square).
    assert uncovered_T.tolist() == [False, True, False, True, True]
    wide = dataclasses.replace(plan, sides_T=np.full(5, 260.0))
    assert not uncovered_frames(wide, marks_T68x2, FramingOptions()).any()


def test_port_weights_overwrite_never_deletes_what_it_did_not_write(tmp_path, capsys,
                                                                    monkeypatch):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "holiday.jpg").write_bytes(b"x")
    checkpoint_copy = tmp_path / "ckpt" / "vox.pth.tar"
    checkpoint_copy.parent.mkdir()
    checkpoint_copy.write_bytes((FIXTURE / "checkpoint.pth.tar").read_bytes())
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    config = FIXTURE / "config.yaml"
    for out, message in ((photos, "not a folder this tool wrote"), (".", "working directory"),
                         (tmp_path / "ckpt", "contains the input")):
        code, err = _run(capsys, "port-weights", "--checkpoint", checkpoint_copy, "--config",
                         config, "--out", out, "--overwrite")
        assert code == 2 and message in err, (out, err)
    assert (photos / "holiday.jpg").is_file() and checkpoint_copy.is_file()
    code, err = _run(capsys, "port-weights", "--checkpoint", checkpoint_copy, "--config", config,
                     "--out", photos / "holiday.jpg", "--overwrite")
    assert code == 2 and "is a file" in err


def test_outputs_that_are_inputs_are_refused_before_any_work(tmp_path, capsys):
    video = tmp_path / "patient.mp4"
    video.write_bytes(b"the only copy")
    model = tmp_path / "model"
    model.mkdir()
    code, err = _run(capsys, "deid", "--input", video, "--identity", SAMPLES / "source.png",
                     "--out", video, "--checkpoint", model, "--overwrite")
    assert code == 2 and "also an input" in err
    code, err = _run(capsys, "deid", "--input", video, "--identity", SAMPLES / "source.png",
                     "--out", tmp_path / "out" / "deid.mp4", "--report", tmp_path / "out",
                     "--checkpoint", model)
    assert code == 2 and "contains the input" in err  # the report would replace the video
    npz = tmp_path / "inputs.npz"
    npz.write_bytes((FIXTURE / "expected.npz").read_bytes())
    code, err = _run(capsys, "parity", "--checkpoint", FIXTURE / "checkpoint.pth.tar",
                     "--config", FIXTURE / "config.yaml", "--inputs", npz, "--out", npz,
                     "--overwrite")
    assert code == 2 and "also an input" in err
    assert video.read_bytes() == b"the only copy"
    assert npz.read_bytes() == (FIXTURE / "expected.npz").read_bytes()


def test_export_weights_refuses_a_video_a_folder_and_leaves_no_partial(tmp_path, capsys,
                                                                       fixture_model_dir):
    video = tmp_path / "clip.mp4"
    video.write_bytes((SAMPLES / "driving.mp4").read_bytes())
    theirs = tmp_path / "downloaded.pth.tar"
    theirs.write_bytes((FIXTURE / "checkpoint.pth.tar").read_bytes())
    code, err = _run(capsys, "export-weights", "--checkpoint", fixture_model_dir, "--out", video)
    assert code == 2 and "written as .pth.tar" in err
    code, err = _run(capsys, "export-weights", "--checkpoint", fixture_model_dir, "--out", theirs)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    code, err = _run(capsys, "export-weights", "--checkpoint", fixture_model_dir, "--out", theirs,
                     "--overwrite")
    assert code == 2 and "not a file this tool wrote" in err
    code, err = _run(capsys, "export-weights", "--checkpoint", fixture_model_dir, "--out",
                     tmp_path)
    assert code == 2 and "is a folder" in err
    assert video.read_bytes() == (SAMPLES / "driving.mp4").read_bytes()
    assert theirs.read_bytes() == (FIXTURE / "checkpoint.pth.tar").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4", "downloaded.pth.tar"]


def test_a_truncated_video_is_an_error_not_a_short_output(tmp_path):
    data = (SAMPLES / "driving.mp4").read_bytes()
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(data[: len(data) * 3 // 10])
    with pytest.raises(SafeTriageError, match=r"truncated .* announces 169 frames but only \d+"):
        with VideoReader(truncated) as reader:
            for _ in reader:
                pass


def test_a_16_bit_greyscale_png_is_read_by_its_bit_depth(tmp_path, rng):
    grey_HW = rng.integers(0, 65536, (40, 48)).astype(np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(grey_HW).save(path)
    rgb = read_image(path)
    assert rgb.shape == (40, 48, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[..., 1], np.round(grey_HW / 257).astype(np.uint8))


def test_non_finite_weights_are_rejected_when_porting_and_loading(tmp_path, fixture_config,
                                                                  fixture_variables):
    from safetriage_jax.porting import export_checkpoint, port_checkpoint
    from flax import traverse_util
    flat = traverse_util.flatten_dict(fixture_variables, sep="/")
    key = next(k for k in sorted(flat) if k.startswith("params/kp_detector/"))
    flat[key] = np.where(np.arange(flat[key].size).reshape(flat[key].shape) % 7 == 0, np.nan,
                         flat[key]).astype(np.float32)
    variables = traverse_util.unflatten_dict(flat, sep="/")
    export_checkpoint(variables, tmp_path / "nan.pth.tar")
    with pytest.raises(SafeTriageError, match=rf"{key} holds \d+ NaN"):
        port_checkpoint(tmp_path / "nan.pth.tar", fixture_config)
    with pytest.raises(SafeTriageError, match="NaN or infinite"):
        model_dirs.save_model(tmp_path / "model", fixture_config, variables)
    assert not (tmp_path / "model").exists()


def test_yaml_typos_are_clear_errors(tmp_path):
    text = (FIXTURE / "config.yaml").read_text()
    for old, new, message in (("num_tps: 10", "num_tpss: 10", "unknown key.*num_tpss.*known keys"),
                              ("num_tps: 10", "num_tps: 1O", "num_tps must be int .*'1O'"),
                              ("num_blocks: 5", "num_blocks: 5.0", "dense_num_blocks must be int"),
                              ("bg: true", "bg: maybe", "bg must be bool")):
        bad = tmp_path / "vox-256.yaml"
        bad.write_text(text.replace(old, new))
        with pytest.raises(SafeTriageError, match=message):
            load_model_config(bad)


def test_overrides_are_strict_and_parsed_one_way():
    cases = [("configs/train.py:small,model.num_tpss=3", "known keys: bg, dense_block_expansion"),
             ("configs/train.py:small,train.batch_size=16.0", "expected an integer"),
             ("configs/tpsmm.py:small,bg=maybe", "true/false/1/0/yes/no"),
             ("configs/prompt.py:small,data.asymmetry=0.1;x", "expected a number"),
             ("configs/train.py:vox-256,model.image_size=384", "data.size .* must agree"),
             ("configs/train.py:small,train.num_epochs=0", "at least one step"),
             ("configs/train.py:small,train.micro_batches=3", r"micro_batches \(3\) .* divide"),
             ("configs/prompt.py:small,train.num_steps=0", "untrained")]
    for spec, message in cases:
        with pytest.raises(SafeTriageError, match=message):
            load_python_config(spec)
    assert load_model_config("configs/tpsmm.py:small,bg=NO,num_tps=3").bg is False


def test_configs_are_found_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_python_config("configs/train.py:small").data.size == 64
    assert load_python_config("prompt.py:small").prompt.resolution == 32
    assert load_model_config("configs/tpsmm.py:ted-384").image_size == 384
    with pytest.raises(SafeTriageError, match=f"does not exist .*{re.escape(str(ROOT))}"):
        load_python_config("configs/nope.py")


def test_a_pth_tar_where_a_model_directory_is_needed_says_so(tmp_path, capsys):
    code, err = _run(capsys, "animate", "--checkpoint", FIXTURE / "checkpoint.pth.tar",
                     "--source", SAMPLES / "source.png", "--driving", SAMPLES / "driving.mp4",
                     "--out", tmp_path / "o.mp4")
    assert code == 2 and "upstream PyTorch checkpoint" in err and "port-weights" in err


def test_parity_with_different_source_and_driving_sizes_is_an_error(tmp_path, rng):
    path = tmp_path / "inputs.npz"
    np.savez(path, source=rng.random((1, 3, 64, 64)), driving=rng.random((1, 3, 32, 32)))
    with pytest.raises(SafeTriageError, match="same shape"):
        read_inputs(path)


def test_evaluate_with_a_model_of_another_resolution_is_an_error(capsys, fixture_model_dir):
    code, err = _run(capsys, "evaluate", "--config", "configs/train.py:small", "--model",
                     fixture_model_dir)
    assert code == 2 and "runs at 256 px" in err and "64 px" in err


def test_the_report_masks_the_original_face_by_default(rng):
    frames = {t: rng.integers(1, 256, (60, 80, 3), dtype=np.uint8) for t in range(2)}
    boxes_T4 = np.array([[20.0, 10.0, 50.0, 40.0], [np.nan] * 4])
    analysis = Analysis(frames, np.zeros((2, 68, 2)), np.array([True, False]), np.zeros((2, 128)))
    shown = masked(analysis, boxes_T4).frames
    assert not shown[0][10:40, 20:50].any() and shown[0][55:, 70:].all()  # face only
    assert not shown[1].any()  # no face found: nothing of the frame is shown


def test_cli_has_a_version_and_a_user_facing_help(capsys):
    assert cli.main(["--version"]) == 0
    assert re.match(r"safetriage \d+\.\d+", capsys.readouterr().out)
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "safetriage demo" in text and "safe to share" in text.lower()


def test_model_directories_get_the_usual_permissions(fixture_model_dir, fixture_config):
    umask = os.umask(0)
    os.umask(umask)
    assert oct(fixture_model_dir.stat().st_mode & 0o777) == oct(0o777 & ~umask)  # not mkdtemp's 0700
    saved = json.loads((fixture_model_dir / "config.json").read_text())
    assert saved["num_tps"] == fixture_config.num_tps


def test_evaluation_keeps_only_a_few_frames_of_a_long_video():
    from safetriage_jax.deid.evaluation import FrameSample
    sample = FrameSample(rows=4)
    for t in range(1000):
        sample.offer(t, {"original": t})
    kept = sorted(sample.of("original"))
    assert len(kept) <= 8 and kept[0] == 0 and kept[-1] >= 700
    assert len(set(np.diff(kept))) == 1  # evenly spaced


# Issue 20: hostile input, bounded waits, interrupted runs.

def test_output_names_are_checked_before_any_work(tmp_path, capsys):
    empty_model = tmp_path / "model"  # loading it would fail: the name must be refused first
    empty_model.mkdir()
    for name in ("out.jpg", "out.png", "out.webm", "out.txt", "out", "x" * 300 + ".mp4"):
        code, err = _run(capsys, "deid", "--input", SAMPLES / "driving.mp4", "--identity",
                         SAMPLES / "source.png", "--checkpoint", empty_model, "--out",
                         tmp_path / name)
        assert code == 2 and ("written as .mp4" in err or "bytes long" in err), (name, err)
        code, err = _run(capsys, "animate", "--checkpoint", empty_model, "--source",
                         SAMPLES / "source.png", "--driving", SAMPLES / "driving.mp4", "--out",
                         tmp_path / name)
        assert code == 2 and ("written as .mp4" in err or "bytes long" in err), (name, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def _png_claiming(path, width, height):
    """A small PNG whose header claims ``width`` x ``height`` (CRC fixed up)."""
    import struct
    import zlib
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


def test_huge_folder_and_device_inputs_are_clear_errors(tmp_path, capsys):
    bomb = tmp_path / "bomb.png"
    _png_claiming(bomb, 65535, 65535)
    with pytest.raises(SafeTriageError, match=r"too large \(its header claims 4295 MP\); at most 50 MP"):
        read_image(bomb)
    _png_claiming(bomb, 10000, 9000)  # under Pillow's own limit, over ours
    with pytest.raises(SafeTriageError, match=r"10000x9000 px \(90 MP\); at most 50 MP"):
        read_image(bomb)
    for path, message in ((tmp_path, "is a folder, not a file"),
                          ("/dev/zero", "is not a regular file")):
        with pytest.raises(SafeTriageError, match=message):
            read_image(path)
        with pytest.raises(SafeTriageError, match=message):
            VideoReader(path)
    code, err = _run(capsys, "animate", "--checkpoint", tmp_path / "none", "--source", bomb,
                     "--driving", SAMPLES / "driving.mp4", "--out", tmp_path / "o.mp4")
    assert code == 2


def test_config_names_resolve_only_to_the_projects_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ran = tmp_path / "ran"
    (tmp_path / "train.py").write_text(f"open({str(ran)!r}, 'w').write('x')\n"
                                       "def get_config(arg=None):\n    return None\n")
    assert load_python_config("train.py:small").data.size == 64  # the project's, not cwd's
    assert not ran.exists()
    for spec, message in (("../../etc/passwd:small", "not a Python config"),
                          ("/etc/passwd", "not a Python config"),
                          ("nope.py:small", "a bare name is looked up only there")):
        with pytest.raises(SafeTriageError, match=message):
            load_python_config(spec)
    with pytest.raises(SafeTriageError, match="not a Python config"):
        load_model_config("../../etc/passwd:small")
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(:\n")
    with pytest.raises(SafeTriageError, match=r"could not be loaded \(SyntaxError") as info:
        load_python_config(f"./{broken.name}")
    assert "\n" not in str(info.value)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model_params:\n  common_params: {num_tps: 10\n  x: [\n")
    with pytest.raises(SafeTriageError, match="not valid YAML at line") as info:
        load_model_config(bad_yaml)
    assert "\n" not in str(info.value)


def test_training_and_model_sizes_have_upper_bounds():
    for spec, message in (
            ("configs/train.py:small,model.image_size=65536,data.size=65536",
             "model.image_size must be from 32 to 1024"),
            ("configs/train.py:small,train.batch_size=1000000000", "train.batch_size must be from"),
            ("configs/prompt.py:small,train.num_steps=1000000000000", "train.num_steps must be from")):
        with pytest.raises(SafeTriageError, match=message):
            load_python_config(spec)
    with pytest.raises(SafeTriageError, match="num_tps must be from 1 to 64"):
        load_model_config("configs/tpsmm.py:small,num_tps=100000")


def test_resume_with_every_checkpoint_damaged_is_refused(tmp_path, capsys):
    from safetriage_jax.train.checkpoints import TrainCheckpoints
    directory = tmp_path / "checkpoints"
    state = {"w": np.zeros(3, np.float32)}
    checkpoints = TrainCheckpoints(directory, async_save=False)
    for step in (1, 2):
        checkpoints.save(step, state, {"model": 1})
    checkpoints.close()
    for data in directory.glob("*/state/d/*"):
        data.write_bytes(b"damaged")
    with pytest.raises(SafeTriageError, match="Every checkpoint .* unreadable.*nothing to resume"):
        TrainCheckpoints(directory, async_save=False).restore_latest(state, {"model": 1})
    printed = capsys.readouterr().out
    assert printed.count("files are damaged or incomplete") == 2
    assert not re.search(r"zarr|OCDBT|tensorstore|source locations|Byte range", printed)


def test_an_unreachable_coordinator_is_one_error_line_in_bounded_time(tmp_path):
    import socket
    import subprocess
    import sys
    import time
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "safetriage_jax.cli", "train", "--config", "configs/train.py:small",
         "--workdir", str(tmp_path / "run"), "--coordinator-address", f"127.0.0.1:{port}",
         "--num-processes", "2", "--process-id", "1", "--coordinator-timeout", "3"],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and time.monotonic() - start < 60
    assert done.stderr.startswith("error:") and done.stderr.count("\n") == 1, done.stderr
    assert f"127.0.0.1:{port}" in done.stderr and "--coordinator-timeout" in done.stderr
    assert not (tmp_path / "run").exists()


def _cli_subprocess(argv, file_size_limit=None, **kwargs):
    """The CLI in a child process; ``file_size_limit``: bytes any one file may grow to (writes
    beyond fail like on a full disk)."""
    import subprocess
    import sys
    prelude = ""
    if file_size_limit:
        prelude = ("import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
                   f"resource.setrlimit(resource.RLIMIT_FSIZE, ({file_size_limit}, "
                   f"{file_size_limit})); ")
    script = prelude + "import sys; from safetriage_jax import cli; sys.exit(cli.main(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", script, *map(str, argv)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tiny_variables):
    from conftest import TINY
    return model_dirs.save_model(tmp_path_factory.mktemp("model") / "tiny", TINY, tiny_variables)


def test_sigterm_is_handled_like_ctrl_c_and_leaves_nothing(tmp_path, tiny_model):
    import signal
    import time
    out = tmp_path / "out" / "animation.mp4"
    out.parent.mkdir()
    child = _cli_subprocess(["animate", "--checkpoint", tiny_model, "--source",
                             SAMPLES / "source.png", "--driving", SAMPLES / "driving.mp4",
                             "--out", out, "--batch", "1"])
    deadline = time.monotonic() + 300
    while not any(".partial" in p.name for p in out.parent.iterdir()):  # writing has begun
        assert child.poll() is None and time.monotonic() < deadline, child.communicate()
        time.sleep(0.02)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
    assert list(out.parent.iterdir()) == []


def test_a_full_disk_in_the_report_stage_leaves_neither_video_nor_report(tmp_path, tiny_model):
    frames_video = tmp_path / "in.mp4"
    with VideoReader(SAMPLES / "driving.mp4") as reader:
        frames = [f for _, f in zip(range(4), reader)]
    from safetriage_jax.video import video_writer
    with video_writer(frames_video, 25, frames[0].shape[1], frames[0].shape[0]) as write:
        write(frames)
    out = tmp_path / "out"
    child = _cli_subprocess(["deid", "--input", frames_video, "--identity", SAMPLES / "source.png",
                             "--checkpoint", tiny_model, "--out", out / "deid.mp4", "--report",
                             out / "report"], file_size_limit=60_000)
    _, err = child.communicate(timeout=600)
    assert child.returncode == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith(f"error: Could not write {out / 'report'}: File too large; "
                                "nothing was written"), err  # the video came first: removed
    assert "Traceback" not in err and "Warning" not in err, err
    assert not out.exists() or list(out.iterdir()) == []


def test_a_full_disk_during_training_is_one_clear_error(tmp_path):
    import errno
    from safetriage_jax import outputs
    from safetriage_jax.train.trainer import owned_workdir
    with pytest.raises(SafeTriageError, match=r"Training stopped: .* \(the disk is full\).*--resume"):
        with owned_workdir(tmp_path / "run"):
            with open("/dev/full", "w") as full:  # a real ENOSPC from the kernel
                full.write("metrics\n")
    code = outputs.os_error_code(ValueError("Failed to write [os_error_code='28']"))
    assert code == errno.ENOSPC  # orbax's form of the same error


def test_an_error_during_a_progress_bar_starts_its_own_line(tmp_path, capsys, tiny_model):
    truncated = tmp_path / "truncated.mp4"
    data = (SAMPLES / "driving.mp4").read_bytes()
    truncated.write_bytes(data[: len(data) * 3 // 10])
    code = cli.main(["deid", "--input", str(truncated), "--identity", str(SAMPLES / "source.png"),
                     "--checkpoint", str(tiny_model), "--out", str(tmp_path / "o.mp4")])
    err = capsys.readouterr().err
    assert code == 2 and "find face" in err  # the bar was drawn
    lines = err.replace("\r", "\n").splitlines()
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error:") and "truncated" in errors[0], err
    assert "Warning" not in err and "Traceback" not in err


def test_the_cli_prints_no_python_warnings(tmp_path, tiny_model):
    child = _cli_subprocess(["export-weights", "--checkpoint", tiny_model, "--out",
                             tmp_path / "tiny.pth.tar"])
    out, err = child.communicate(timeout=300)
    assert child.returncode == 0 and "Wrote upstream-layout checkpoint" in out
    assert err == "", err  # torch warned of non-writable arrays here before
