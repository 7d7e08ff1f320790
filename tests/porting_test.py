"""Porting upstream checkpoints: parity with the real PyTorch outputs, round trips, clear errors."""

import dataclasses

import jax
import numpy as np
import pytest
import torch

from conftest import FIXTURE, TINY
from safetriage_jax import cli, outputs
from safetriage_jax import model_dir as model_dirs
from safetriage_jax.errors import SafeTriageError
from safetriage_jax.models.tpsmm import variable_shapes
from safetriage_jax.parity import relative_error
from safetriage_jax.porting import (export_checkpoint, load_torch_checkpoint, port_checkpoint,
                                    torch_to_flax)

EXPECTED_OUTPUTS = (
    ["kp_source", "kp_driving", "bg_param", "avd_kp"]
    + [f"{tag}_{name}" for tag in ("nobg", "bg")
       for name in ["deformation", "contribution_maps", "prediction", "deformed"]
       + [f"occlusion_{i}" for i in range(4)]])


def test_parity_command_matches_upstream_pytorch(tmp_path, capsys):
    """`safetriage parity` on the shared fixture: every output within 1e-4 relative error."""
    out = tmp_path / "result.npz"
    code = cli.main(["parity", "--checkpoint", str(FIXTURE / "checkpoint.pth.tar"),
                     "--config", str(FIXTURE / "config.yaml"),
                     "--inputs", str(FIXTURE / "expected.npz"), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    result, expected = np.load(out), np.load(FIXTURE / "expected.npz")
    assert sorted(result) == sorted([*EXPECTED_OUTPUTS, outputs.MARK_KEY])  # + the tool's mark
    for name in EXPECTED_OUTPUTS:
        assert result[name].shape == expected[name].shape, name
        assert result[name].dtype == np.float32, name
        err = relative_error(result[name], expected[name])
        assert err < 1e-4, (name, err)


def test_parity_command_fails_loudly_on_wrong_expectations(tmp_path, capsys):
    expected = dict(np.load(FIXTURE / "expected.npz"))
    expected["kp_source"] = expected["kp_source"] + 0.1
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, **expected)
    code = cli.main(["parity", "--checkpoint", str(FIXTURE / "checkpoint.pth.tar"),
                     "--config", str(FIXTURE / "config.yaml"), "--inputs", str(inputs),
                     "--out", str(tmp_path / "r.npz")])
    captured = capsys.readouterr()
    assert code == 2
    assert "kp_source" in captured.out and "above tolerance" in captured.out
    assert "Parity failed" in captured.err and "Traceback" not in captured.err


def test_model_directory_round_trip(tmp_path, fixture_config, fixture_variables):
    model_dir = model_dirs.save_model(tmp_path / "m", fixture_config, fixture_variables,
                                      safetensors=True)
    config, variables = model_dirs.load_model(model_dir)
    assert config == fixture_config
    assert jax.tree.all(jax.tree.map(np.array_equal, variables, fixture_variables))
    (model_dir / model_dirs.ORBAX_DIR).rename(tmp_path / "moved")  # safetensors alone suffices
    _, from_safetensors = model_dirs.load_model(model_dir)
    assert jax.tree.all(jax.tree.map(np.array_equal, from_safetensors, fixture_variables))


def test_export_reproduces_the_upstream_checkpoint(tmp_path, fixture_variables):
    export_checkpoint(fixture_variables, tmp_path / "back.pth.tar")
    original = torch.load(FIXTURE / "checkpoint.pth.tar", map_location="cpu", weights_only=True)
    exported = torch.load(tmp_path / "back.pth.tar", map_location="cpu", weights_only=True)
    for module, state in original.items():
        if not isinstance(state, dict):
            continue
        assert set(exported[module]) == set(state), module
        for key, tensor in state.items():
            if not key.endswith("num_batches_tracked"):
                assert torch.equal(exported[module][key], tensor.float()), key


@pytest.mark.parametrize("changes", [
    {}, {"bg": False}, {"multi_mask": False, "num_tps": 3}, {"scale_factor": 0.5, "image_size": 128}])
def test_flax_to_torch_to_flax_is_identity(tmp_path, rng, changes):
    config = dataclasses.replace(TINY, **changes)
    variables = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32),
                             variable_shapes(config))
    export_checkpoint(variables, tmp_path / "x.pth.tar")
    back = port_checkpoint(tmp_path / "x.pth.tar", config)
    assert jax.tree.all(jax.tree.map(np.array_equal, back, variables))


def test_mismatched_config_names_first_bad_key(fixture_config):
    modules = load_torch_checkpoint(FIXTURE / "checkpoint.pth.tar")
    wrong = dataclasses.replace(fixture_config, num_tps=5)
    with pytest.raises(SafeTriageError, match=r"do not match at \w+\.[\w.]+: the checkpoint has shape \(100(, 512)?,?\) but the config needs \(50"):
        torch_to_flax(modules, wrong)
    with pytest.raises(SafeTriageError, match="no place in the model"):
        torch_to_flax(modules, dataclasses.replace(fixture_config, bg=False))


def test_checkpoint_lacking_a_network_is_rejected(tmp_path, fixture_config):
    modules = load_torch_checkpoint(FIXTURE / "checkpoint.pth.tar")
    del modules["dense_motion_network"]
    with pytest.raises(SafeTriageError, match="no 'dense_motion_network' network"):
        torch_to_flax(modules, fixture_config)


def test_bad_files_give_one_clear_error(tmp_path, capsys):
    garbage = tmp_path / "vox.pth.tar"
    garbage.write_bytes(b"not a checkpoint at all")
    for path, message in [(tmp_path / "missing.pth.tar", "does not exist"),
                          (garbage, "Could not read")]:
        code = cli.main(["port-weights", "--checkpoint", str(path), "--config",
                         str(FIXTURE / "config.yaml"), "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err
        assert not (tmp_path / "out").exists()


def test_port_weights_command_writes_a_loadable_directory(tmp_path, capsys, fixture_variables):
    out = tmp_path / "ported"
    args = ["port-weights", "--checkpoint", str(FIXTURE / "checkpoint.pth.tar"),
            "--config", str(FIXTURE / "config.yaml"), "--out", str(out)]
    assert cli.main(args) == 0
    _, variables = model_dirs.load_model(out)
    assert jax.tree.all(jax.tree.map(np.array_equal, variables, fixture_variables))
    assert cli.main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert cli.main(args + ["--overwrite"]) == 0
