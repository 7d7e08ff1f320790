"""The one atomic writer: outputs are never inputs, overwrite replaces only our own outputs,
bad locations are refused before any work, and nothing half-written is left behind."""

import json
import os
import stat
import subprocess
import sys

import pytest

from safetriage_jax import outputs
from safetriage_jax.errors import SafeTriageError
from safetriage_jax.outputs import OutputExistsError


def test_an_output_that_is_an_input_is_refused_by_path_link_or_inode(tmp_path):
    video = tmp_path / "patient.mp4"
    video.write_bytes(b"original")
    (tmp_path / "link.mp4").symlink_to(video)
    os.link(video, tmp_path / "hard.mp4")
    for out in (video, tmp_path / "sub" / ".." / "patient.mp4", tmp_path / "link.mp4",
                tmp_path / "hard.mp4"):
        with pytest.raises(SafeTriageError, match="also an input"):
            outputs.check_output(out, "video", inputs=[video], overwrite=True)
    assert video.read_bytes() == b"original"


def test_an_existing_output_is_refused_unless_overwriting(tmp_path):
    out = tmp_path / "metrics.json"
    outputs.write_json(out, {"v": 1})
    with pytest.raises(OutputExistsError, match="already exists"):
        outputs.write_json(out, {"v": 2})
    outputs.write_json(out, {"v": 3}, overwrite=True)
    assert json.loads(out.read_text())["v"] == 3


def test_overwrite_replaces_only_a_folder_this_tool_wrote(tmp_path, monkeypatch):
    ours = tmp_path / "model"
    with outputs.atomic_directory(ours) as staging:
        (staging / "config.json").write_text("{}")
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"x")
    with outputs.atomic_directory(ours, overwrite=True) as staging:
        (staging / "config.json").write_text('{"new": 1}')
    assert (ours / "config.json").read_text() == '{"new": 1}'
    with pytest.raises(SafeTriageError, match="not a folder this tool wrote"):
        outputs.check_output(foreign, "folder", overwrite=True)
    monkeypatch.chdir(foreign)
    for out in (".", tmp_path):  # the working directory and its parent
        with pytest.raises(SafeTriageError, match="working directory"):
            outputs.check_output(out, "folder", overwrite=True)
    with pytest.raises(SafeTriageError, match="contains the input"):
        outputs.check_output(tmp_path, "folder", inputs=[ours / "config.json"], overwrite=True)
    assert (foreign / "holiday.jpg").is_file()


def test_a_file_output_onto_a_folder_and_the_reverse_are_refused(tmp_path):
    (tmp_path / "folder.json").mkdir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(SafeTriageError, match="is a folder"):
        outputs.check_output(tmp_path / "folder.json", "json", overwrite=True)
    with pytest.raises(SafeTriageError, match="is a file"):
        outputs.check_output(tmp_path / "file", "folder", overwrite=True)
    with pytest.raises(SafeTriageError, match="is a file, not a folder"):
        outputs.check_output(tmp_path / "file" / "out.mp4", "video")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_location_is_refused_before_writing(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(SafeTriageError, match="not writable"):
            outputs.check_output(locked / "deeper" / "out.mp4", "video")
    finally:
        locked.chmod(stat.S_IRWXU)


def test_a_full_disk_is_refused_before_writing(tmp_path):
    with pytest.raises(SafeTriageError, match="MB free"):
        outputs.check_output(tmp_path / "big.pth.tar", "torch", need_bytes=1 << 62)


def test_a_failed_write_leaves_nothing_and_keeps_the_old_output(tmp_path):
    out = tmp_path / "report"
    with outputs.atomic_directory(out) as staging:
        (staging / "report.html").write_text("old")
    with pytest.raises(RuntimeError):
        with outputs.atomic_directory(out, overwrite=True) as staging:
            (staging / "report.html").write_text("half")
            raise RuntimeError("killed")
    with pytest.raises(SafeTriageError, match="Nothing was written"):
        with outputs.atomic_file(tmp_path / "empty.npz", "npz"):
            pass
    assert (out / "report.html").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def test_leftovers_of_a_killed_run_are_removed_by_the_next_write(tmp_path):
    out = tmp_path / "deid.json"
    script = ("import sys, os; from safetriage_jax import outputs\n"
              "with outputs.atomic_file(sys.argv[1], 'json') as staging:\n"
              "    staging.write_bytes(b'half'); os.kill(os.getpid(), 9)\n")
    subprocess.run([sys.executable, "-c", script, str(out)], timeout=120, check=False)
    assert [p.name for p in tmp_path.iterdir() if ".partial" in p.name]  # SIGKILL left it
    live = tmp_path / f".deid.json.{os.getppid()}.partial.json"  # a running process's: kept
    live.write_bytes(b"in progress")
    other = tmp_path / ".report.999999999.partial"  # another output's, in the same folder
    other.mkdir()
    outputs.write_json(out, {"done": True})
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "deid.json"]


def test_written_files_and_folders_get_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        with outputs.atomic_directory(tmp_path / "model") as staging:
            (staging / "config.json").write_text("{}")
        outputs.write_json(tmp_path / "metrics.json", {})
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "metrics.json").stat().st_mode) == 0o644


def test_the_training_config_replaces_only_an_earlier_runs(tmp_path):
    """A work directory's config.json is rewritten by every run, but a foreign one is kept."""
    import ml_collections

    from safetriage_jax.train import trainer
    config = ml_collections.ConfigDict({"train": {"batch_size": 2}})
    trainer._write_config(tmp_path / "run", config)
    config.train.batch_size = 4
    trainer._write_config(tmp_path / "run", config)  # a resumed or repeated run
    assert '"batch_size": 4' in (tmp_path / "run" / "config.json").read_text()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.json").write_text('{"my": "notes"}')
    with pytest.raises(SafeTriageError, match="not a file this tool wrote"):
        trainer._write_config(tmp_path / "mine", config)
    assert (tmp_path / "mine" / "config.json").read_text() == '{"my": "notes"}'
