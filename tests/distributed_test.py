"""Multi-process training through the CLI: two local processes (one CPU device each, gloo
collectives on 127.0.0.1) against one process with two devices, same seed and global batch.

One run sequence, shared by the tests below: (1) one process, two devices, 6 steps (the
reference); (2) two processes, killed once step 2 is checkpointed; (3) the same two resumed to step 4
(sample grids at steps 2 and 4, the model); (4) that work directory resumed on one process
to step 6. (1) runs beside (2); every process reads the session's prepared TINY_TRAIN dataset
and shares the session's persistent XLA cache, so (3) and (4) reuse the programs (2) and (1)
compiled. Every wait is bounded; a hang kills the process groups and fails with the logs.
"""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import TINY_TRAIN, cpu_devices_env
from safetriage_jax import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 600
SETTINGS = ("train.batch_size=2,log.every_steps=1,log.checkpoint_every_steps=2,"
            "log.keep_checkpoints=5")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(workdir, data_dir, *, processes, devices, num_steps, resume=False, samples=0,
           stage="run"):
    """Starts ``processes`` CLI training processes (each its own process group), logging to
    ``workdir``.<stage>.log-<i>; returns the Popen objects."""
    spec = (f"{ROOT}/configs/train.py:{TINY_TRAIN},data.data_dir={data_dir},{SETTINGS},"
            f"train.num_steps={num_steps},log.sample_every_steps={samples}")
    env = cpu_devices_env(devices)  # with the session's compilation cache
    port = free_port()
    runs = []
    for index in range(processes):
        argv = [sys.executable, "-m", "safetriage_jax.cli", "train", "--config", spec,
                "--workdir", str(workdir)] + (["--resume"] if resume else [])
        if processes > 1:
            argv += ["--coordinator-address", f"127.0.0.1:{port}",
                     "--num-processes", str(processes), "--process-id", str(index)]
        log = open(f"{workdir}.{stage}.log-{index}", "a")
        runs.append(subprocess.Popen(argv, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True))
        log.close()
    return runs


def kill(runs):
    """SIGKILLs every process group first, then waits (a survivor would report the others'
    death)."""
    for run in runs:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    for run in runs:
        run.wait(timeout=30)


def logs(workdir, stage="*"):
    return "\n".join(pathlib.Path(p).read_text(errors="replace")[-3000:]
                     for p in sorted(map(str, workdir.parent.glob(f"{workdir.name}.{stage}.log-*"))))


def finish(runs, workdir, timeout=RUN_TIMEOUT_S):
    """Waits for every process (bounded); fails with the logs if one fails or hangs."""
    deadline = time.monotonic() + timeout
    try:
        codes = [run.wait(timeout=max(1.0, deadline - time.monotonic())) for run in runs]
    except subprocess.TimeoutExpired:
        kill(runs)
        pytest.fail(f"training hung for {timeout} s:\n{logs(workdir)}")
    if any(codes):
        kill(runs)
        pytest.fail(f"training exited {codes}:\n{logs(workdir)}")


def kill_after_checkpoint(runs, workdir, step, timeout=RUN_TIMEOUT_S):
    """Kills ``runs`` as soon as checkpoint ``step`` is committed."""
    deadline = time.monotonic() + timeout
    while not (workdir / "checkpoints" / str(step)).is_dir():
        if time.monotonic() > deadline or any(run.poll() is not None for run in runs):
            kill(runs)
            pytest.fail(f"no checkpoint {step} within {timeout} s:\n{logs(workdir)}")
        time.sleep(0.2)
    kill(runs)


def losses(workdir):
    """step -> loss, the last value logged for each step (a killed run logs some twice)."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_data_dir):
    root = tmp_path_factory.mktemp("distributed")
    data_dir = tiny_data_dir  # prepared: the runs only read it
    reference, two = root / "one-process", root / "two-processes"
    reference_runs = launch(reference, data_dir, processes=1, devices=2, num_steps=6)
    try:
        kill_after_checkpoint(launch(two, data_dir, processes=2, devices=1, num_steps=100,
                                     samples=2, stage="killed"), two, step=2)
    except BaseException:
        kill(reference_runs)
        raise
    finish(reference_runs, reference)
    killed_losses = losses(two)
    finish(launch(two, data_dir, processes=2, devices=1, num_steps=4, resume=True, samples=2,
                  stage="resumed"), two)
    two_losses = losses(two)
    two_model = root / "two-process-model"
    shutil.copytree(two / "model", two_model)
    two_samples = sorted(p.name for p in (two / "samples").glob("*.png"))
    finish(launch(two, data_dir, processes=1, devices=2, num_steps=6, resume=True), two)
    one_losses = {step: loss for step, loss in losses(two).items() if step > 4}
    return dict(two=two, two_model=two_model, two_samples=two_samples,
                reference_losses=losses(reference), killed_losses=killed_losses,
                two_losses=two_losses, one_losses=one_losses)


def test_two_processes_train_like_one_with_two_devices_across_a_kill(runs):
    reference, killed, two = runs["reference_losses"], runs["killed_losses"], runs["two_losses"]
    assert set(two) == {1, 2, 3, 4} and {1, 2} <= set(killed)
    for step, loss in two.items():  # killed at step >= 2, resumed from the step-2 checkpoint
        np.testing.assert_allclose(loss, reference[step], rtol=1e-6, err_msg=f"step {step}")


def test_two_processes_write_checkpoints_samples_and_the_model(runs):
    from safetriage_jax.model_dir import load_model
    two = runs["two"]
    assert {"2", "4"} <= {p.name for p in (two / "checkpoints").iterdir()}
    assert runs["two_samples"] == ["step_00000002.png", "step_00000004.png"]
    config, _ = load_model(runs["two_model"])
    assert config.num_tps == 2
    assert not list(two.glob(".model.*")), "a staging folder was left behind"
    resumed = logs(two, "resumed")  # the killed run's survivor may report its peer's death
    assert resumed and "Traceback" not in resumed and "Event loop is closed" not in resumed


def test_a_two_process_checkpoint_continues_the_same_stream_on_one_process(runs):
    reference, one = runs["reference_losses"], runs["one_losses"]
    assert set(one) == {5, 6}
    for step, loss in one.items():
        np.testing.assert_allclose(loss, reference[step], rtol=1e-6, err_msg=f"step {step}")


@pytest.mark.parametrize("flags, message", [
    (["--coordinator-address", "127.0.0.1:1234"], "missing: number of processes, process id"),
    (["--coordinator-address", "localhost", "--num-processes", "2", "--process-id", "0"],
     "not HOST:PORT"),
    (["--coordinator-address", "h:70000", "--num-processes", "2", "--process-id", "0"],
     "not HOST:PORT"),
    (["--coordinator-address", "h:1", "--num-processes", "2", "--process-id", "2"],
     "must be in 0...1"),
    (["--coordinator-address", "h:1", "--num-processes", "0", "--process-id", "0"],
     "at least 1"),
    (["--coordinator-address", "h:1", "--num-processes", "two", "--process-id", "0"],
     "must be an integer"),
])
def test_bad_launch_settings_give_one_error_line(tmp_path, capsys, flags, message):
    argv = ["train", "--config", f"{ROOT}/configs/train.py:small", "--workdir", str(tmp_path)]
    assert cli.main(argv + flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not list(tmp_path.iterdir())


def test_launch_settings_come_from_the_environment_and_flags_win():
    from safetriage_jax.errors import SafeTriageError
    from safetriage_jax.train.distributed import Launch, launch_settings
    environ = {"SAFETRIAGE_COORDINATOR_ADDRESS": "10.0.0.1:9999",
               "SAFETRIAGE_NUM_PROCESSES": "4", "SAFETRIAGE_PROCESS_ID": "3"}
    assert launch_settings(environ=environ) == Launch("10.0.0.1:9999", 4, 3)
    assert launch_settings(process_id=1, environ=environ) == Launch("10.0.0.1:9999", 4, 1)
    assert launch_settings(environ={}) == Launch() and not Launch().explicit
    with pytest.raises(SafeTriageError, match="must be an integer"):
        launch_settings(environ=dict(environ, SAFETRIAGE_NUM_PROCESSES="four"))
