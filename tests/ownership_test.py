"""Nothing of the user's is ever replaced (issue 20): the tool overwrites only what carries its
own mark, whatever the command, and claims a work directory before any work."""


import av
import numpy as np
import pytest

from conftest import FIXTURE, SAMPLES, TINY
from safetriage_jax import cli, outputs
from safetriage_jax.errors import SafeTriageError
from safetriage_jax.video import video_writer


def _run(capsys, *argv):
    """(exit code, stderr) of the CLI; an error is one `error:` line without a traceback."""
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    if code == 2:
        assert err.startswith("error:") and err.count("\n") == 1, err
    return code, err


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_every_written_kind_carries_the_mark_and_is_recognised_by_it(tmp_path, tiny_variables):
    from safetriage_jax.porting import export_checkpoint
    video = tmp_path / "ours.mp4"
    with video_writer(video, 25, 32, 32) as write:
        write(np.zeros((2, 32, 32, 3), np.uint8))
    with av.open(str(video)) as container:  # the tag survives the muxer
        assert outputs.is_mark(container.metadata[outputs.VIDEO_TAG])
    export_checkpoint(tiny_variables, tmp_path / "ours.pth.tar")
    outputs.write_json(tmp_path / "ours.json", {"a": 1})
    with outputs.atomic_directory(tmp_path / "ours") as staging:
        (staging / "config.json").write_text("{}")
    for path, kind in ((video, "video"), (tmp_path / "ours.pth.tar", "torch"),
                       (tmp_path / "ours.json", "json"), (tmp_path / "ours", "folder")):
        assert outputs.is_ours(path, kind), path
    # The same formats without the mark are not ours, whatever their shape.
    foreign = {"video": SAMPLES / "driving.mp4", "torch": FIXTURE / "checkpoint.pth.tar",
               "npz": FIXTURE / "expected.npz", "folder": FIXTURE}
    for kind, path in foreign.items():
        assert not outputs.is_ours(path, kind), path
    (tmp_path / "theirs.json").write_text('{"safetriage_output": "safetriage-jax:guess"}')
    assert not outputs.is_ours(tmp_path / "theirs.json", "json")


def test_overwrite_never_replaces_a_users_file_or_folder(tmp_path, capsys, tiny_variables):
    from safetriage_jax.model_dir import save_model
    model = save_model(tmp_path / "model", TINY, tiny_variables)
    docker = tmp_path / "docker"  # a user's folder that looks like a model directory
    (docker / "variables").mkdir(parents=True)
    (docker / "config.json").write_text('{"auths": {}}')
    (docker / "variables" / "data.bin").write_bytes(b"user data")
    only_config = tmp_path / "settings"
    only_config.mkdir()
    (only_config / "config.json").write_text('{"theme": "dark"}')
    user_files = {name: tmp_path / name for name in
                  ("thesis.docx", "backup.zip", "other_patient.mp4", "theirs.pth.tar",
                   "theirs.npz", "notes.json")}
    user_files["other_patient.mp4"].write_bytes((SAMPLES / "driving.mp4").read_bytes())
    user_files["theirs.pth.tar"].write_bytes((FIXTURE / "checkpoint.pth.tar").read_bytes())
    user_files["theirs.npz"].write_bytes((FIXTURE / "expected.npz").read_bytes())
    for name in ("thesis.docx", "backup.zip", "notes.json"):
        user_files[name].write_bytes(b"PK\x03\x04 the user's own work")
    report = tmp_path / "report"
    report.mkdir()
    (report / "report.html").write_text("<p>a clinician's own report</p>")
    before = _snapshot(tmp_path)

    ckpt, config = FIXTURE / "checkpoint.pth.tar", FIXTURE / "config.yaml"
    cases = [
        (["port-weights", "--checkpoint", ckpt, "--config", config, "--out", docker], "no safetriage mark"),
        (["port-weights", "--checkpoint", ckpt, "--config", config, "--out", only_config], "no safetriage mark"),
        (["export-weights", "--checkpoint", model, "--out", user_files["thesis.docx"]], r"\.pth\.tar"),
        (["export-weights", "--checkpoint", model, "--out", user_files["backup.zip"]], r"\.pth\.tar"),
        (["export-weights", "--checkpoint", model, "--out", user_files["theirs.pth.tar"]], "no safetriage mark"),
        (["parity", "--checkpoint", ckpt, "--config", config, "--inputs", FIXTURE / "expected.npz",
          "--out", tmp_path / "x.docx"], r"\.npz"),
        (["parity", "--checkpoint", ckpt, "--config", config, "--inputs", FIXTURE / "expected.npz",
          "--out", user_files["theirs.npz"]], "no safetriage mark"),
        (["evaluate-deid", "--original", SAMPLES / "driving.mp4", "--deid", SAMPLES / "driving.mp4",
          "--report", report], "no safetriage mark"),
        (["deid", "--input", SAMPLES / "driving.mp4", "--identity", SAMPLES / "source.png",
          "--checkpoint", model, "--out", user_files["other_patient.mp4"]], "no safetriage mark"),
        (["animate", "--checkpoint", model, "--source", SAMPLES / "source.png", "--driving",
          SAMPLES / "driving.mp4", "--out", user_files["other_patient.mp4"]], "no safetriage mark"),
        (["evaluate", "--config", "configs/train.py:small", "--model", model, "--out",
          user_files["other_patient.mp4"]], r"\.json"),
        (["evaluate", "--config", "configs/train.py:small", "--model", model, "--out",
          user_files["notes.json"]], "no safetriage mark"),
    ]
    for argv, message in cases:
        code, err = _run(capsys, *argv, "--overwrite")
        assert code == 2 and __import__("re").search(message, err), (argv, err)
    assert _snapshot(tmp_path) == before


def test_our_own_outputs_are_replaced_with_overwrite(tmp_path, capsys, tiny_variables):
    from safetriage_jax.model_dir import save_model
    model = save_model(tmp_path / "model", TINY, tiny_variables)
    out = tmp_path / "export.pth.tar"
    assert _run(capsys, "export-weights", "--checkpoint", model, "--out", out)[0] == 0
    first = out.read_bytes()
    assert _run(capsys, "export-weights", "--checkpoint", model, "--out", out)[0] == 2
    assert _run(capsys, "export-weights", "--checkpoint", model, "--out", out, "--overwrite")[0] == 0
    assert out.read_bytes() != first  # a fresh mark: the file was rewritten
    save_model(model, TINY, tiny_variables, overwrite=True)


def test_a_target_that_appears_during_the_run_is_never_replaced(tmp_path):
    out = tmp_path / "deid.json"
    with pytest.raises(SafeTriageError, match="appeared while this run was writing"):
        with outputs.atomic_file(out, "json") as staging:
            staging.write_text(outputs.marked_json({"run": 1}))
            out.write_text("another run's result")  # a second run finished first
    assert out.read_text() == "another run's result"
    folder = tmp_path / "report"
    with pytest.raises(SafeTriageError, match="appeared while this run was writing"):
        with outputs.atomic_directory(folder) as staging:
            folder.mkdir()
            (folder / "report.html").write_text("theirs")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deid.json", "report"]


def test_training_claims_its_work_directory_before_any_work(tmp_path, capsys):
    user = tmp_path / "project"
    user.mkdir()
    (user / "config.json").write_text('{"mine": true}')
    (user / "metrics.jsonl").write_text("my numbers\n")
    before = _snapshot(user)
    for command, config in (("train", "configs/train.py:small"),
                            ("train-prompt", "configs/prompt.py:small")):
        code, err = _run(capsys, command, "--config", config, "--workdir", user)
        assert code == 2 and "no safetriage mark" in err, err
    assert _snapshot(user) == before
    code, err = _run(capsys, "train", "--config", "configs/train.py:small", "--workdir",
                     user / "config.json")
    assert code == 2 and "is a file, not a folder" in err

    run = tmp_path / "run"
    outputs.claim_folder(run)
    with outputs.folder_lock(run):  # a training already running there
        code, err = _run(capsys, "train", "--config", "configs/train.py:small", "--workdir", run)
    assert code == 2 and "Another run is using the work directory" in err
    assert sorted(p.name for p in run.iterdir()) == [outputs.LOCK_FILE, outputs.MARKER_FILE]
