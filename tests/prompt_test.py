"""The diffusion prompt generator: sampler properties, simulated patients, frozen-backbone training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, SAMPLES, TINY
from safetriage_jax import cli
from safetriage_jax.config_loader import load_python_config
from safetriage_jax.data.simulated_patients import IMAGE_KEYS, PatientOptions, SimulatedPatients
from safetriage_jax.errors import SafeTriageError
from safetriage_jax.model_dir import load_model, load_prompt, save_model
from safetriage_jax.models import prompt as prompt_lib

SMALL = prompt_lib.PromptConfig(resolution=16, widths=(8, 16), num_sample_steps=3)
prompted = jax.jit(prompt_lib.prompted, static_argnums=1)  # one compile per shape, not per op


def _images(rng, batch, size=32):
    return jnp.asarray(rng.uniform(0, 1, (batch, size, size, 3)), jnp.float32)


def _last_conv(params):
    return max((k for k in params if k.startswith("Conv_")), key=lambda k: int(k.split("_")[1]))


def test_untrained_generator_leaves_the_frames_unchanged(rng):
    params = prompt_lib.init_params(SMALL, jax.random.PRNGKey(0))
    driving = _images(rng, 3)
    out, x0 = prompted(params, SMALL, driving, driving[:1], driving[:1])
    assert np.array_equal(np.asarray(out), np.asarray(driving)) and not np.any(x0)


def test_a_constant_denoiser_samples_its_constant(rng):
    """DDIM wiring: when the network always predicts the same x0, the sampler returns it."""
    params = prompt_lib.init_params(SMALL, jax.random.PRNGKey(0))
    last = _last_conv(params)
    bias = jnp.asarray(rng.normal(0, 1, 3), jnp.float32)
    params = {**params, last: {"kernel": jnp.zeros_like(params[last]["kernel"]), "bias": bias}}
    driving = _images(rng, 3)  # the shapes of the test above: one compilation for both
    out, x0 = prompted(params, SMALL, driving, driving[:1], driving[:1])
    np.testing.assert_allclose(x0, np.broadcast_to(bias, x0.shape), rtol=1e-6)
    np.testing.assert_allclose(out - driving, np.broadcast_to(
        SMALL.amplitude * np.tanh(bias), driving.shape), atol=1e-6)


def test_each_frame_prompt_depends_only_on_its_own_condition_and_has_gradients(rng):
    params = prompt_lib.init_params(SMALL, jax.random.PRNGKey(1))
    last = _last_conv(params)
    params = {**params, last: {"kernel": jnp.asarray(rng.normal(0, 0.05, params[last]["kernel"].shape),
                                                     jnp.float32), "bias": params[last]["bias"]}}
    driving, reference, identity = _images(rng, 3), _images(rng, 1), _images(rng, 1)
    together, _ = prompted(params, SMALL, driving, reference, identity)
    alone, _ = prompted(params, SMALL, driving[1:2], reference, identity)
    again, _ = prompted(params, SMALL, driving, reference, identity)
    assert np.abs(np.asarray(together - driving)).max() > 1e-3  # a real prompt
    np.testing.assert_allclose(together[1:2], alone, rtol=1e-5, atol=1e-6)
    assert np.array_equal(np.asarray(together), np.asarray(again))
    grads = jax.grad(lambda p: jnp.sum(prompted(p, SMALL, driving, reference,
                                                            identity)[0] ** 2))(params)
    norms = [float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(norms)) and sum(n > 0 for n in norms) > len(norms) // 2


def test_simulated_patients_are_reproducible_and_split(rng):
    train = SimulatedPatients(PatientOptions(size=48), seed=3)
    test = SimulatedPatients(PatientOptions(size=48), seed=3, split="test")
    index = int(rng.integers(0, 10**6))
    a, b = train[index], train[index]
    assert all(np.array_equal(a[k], b[k]) for k in a) and a["driving"].shape == (48, 48, 3)
    assert not np.array_equal(a["identity"], test[index]["identity"])
    assert not np.array_equal(a["identity"], a["reference"])  # two different people


def test_prompt_configs_load_and_reject_bad_values():
    small = load_python_config(f"{ROOT}/configs/prompt.py:small,train.num_steps=7")
    assert small.train.num_steps == 7 and small.prompt.resolution == 32
    assert load_python_config(f"{ROOT}/configs/prompt.py:vox-256").backbone == "models/vox"
    with pytest.raises(SafeTriageError, match="variant"):
        load_python_config(f"{ROOT}/configs/prompt.py:huge")
    with pytest.raises(SafeTriageError, match="divisible"):
        prompt_lib.PromptConfig.from_dict({"resolution": 30, "widths": [8, 16, 32]})


def test_training_moves_only_the_prompt_and_deid_uses_it(tmp_path, tiny_variables):
    backbone_dir = save_model(tmp_path / "backbone", TINY, tiny_variables)
    before = jax.tree.map(np.asarray, load_model(backbone_dir)[1])
    workdir = tmp_path / "run"
    argv = ["train-prompt", "--workdir", str(workdir), "--config",
            f"{ROOT}/configs/prompt.py:small,backbone={backbone_dir},train.batch_size=2,"
            "train.num_steps=2,train.warmup_steps=1,prompt.resolution=16,prompt.widths=8;16,"
            "prompt.num_sample_steps=2,train.scales=1.0,train.loss_weights.perceptual=10;0;0;0;0,"
            "log.every_steps=1,log.sample_every_steps=0"]
    assert cli.main(argv) == 0
    after = jax.tree.map(np.asarray, load_model(backbone_dir)[1])
    assert jax.tree.all(jax.tree.map(np.array_equal, before, after))  # frozen: bit-identical
    assert jax.tree.all(jax.tree.map(np.array_equal, before, jax.tree.map(np.asarray, tiny_variables)))
    config, params = load_prompt(workdir / "prompt")
    untrained = prompt_lib.init_params(config, jax.random.PRNGKey(0))
    assert not np.array_equal(params[_last_conv(params)]["kernel"],
                              untrained[_last_conv(untrained)]["kernel"])  # the prompt learned
    assert (workdir / "metrics.jsonl").read_text().count("denoising") == 2

    from safetriage_jax.video import VideoReader, video_writer
    with VideoReader(SAMPLES / "driving.mp4") as reader:
        frames = [f for _, f in zip(range(2), reader)]
    video = tmp_path / "in.mp4"
    with video_writer(video, 25, 410, 412) as write:
        write(frames)
    out = tmp_path / "deid.mp4"
    assert cli.main(["deid", "--input", str(video), "--identity", str(SAMPLES / "source.png"),
                     "--out", str(out), "--checkpoint", str(backbone_dir),
                     "--prompt-checkpoint", str(workdir / "prompt")]) == 0
    assert out.is_file()
    with pytest.raises(SafeTriageError, match="not a prompt-generator directory"):
        load_prompt(backbone_dir)


def test_patient_batches_are_the_same_stream_for_any_process_count_and_resume():
    from safetriage_jax.data.pipeline import process_batches
    from safetriage_jax.data.simulated_patients import patient_batches
    options = PatientOptions(size=32, clip_frames=6)
    reference = list(patient_batches(options, 2, seed=5, num_steps=2))
    patients = SimulatedPatients(options, seed=5)
    second_half = list(process_batches(patients, global_batch_size=2, start_step=1, num_steps=2,
                                       process_index=1, process_count=2))
    assert len(reference) == 2 and len(second_half) == 1
    for key in IMAGE_KEYS:
        np.testing.assert_array_equal(reference[1][key], np.stack([patients[2][key], patients[3][key]]))
        np.testing.assert_array_equal(second_half[0][key], reference[1][key][1:])
