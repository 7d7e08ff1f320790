"""The Flax TPSMM: gradients, cached-source inference, configs, geometry."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY
from safetriage_jax.errors import SafeTriageError
from safetriage_jax.models import geometry
from safetriage_jax.models.config import TPSMMConfig, load_model_config
from safetriage_jax.models.layers import resize_bilinear_align_corners, resize_nearest
from safetriage_jax.models.tpsmm import TPSMM, variable_shapes


def _frames(rng, batch, size):
    return jnp.asarray(rng.uniform(size=(batch, size, size, 3)), jnp.float32)


def test_training_gradients_exist_and_are_finite(rng, tiny_variables):
    model = TPSMM(TINY)
    source, driving = _frames(rng, 2, TINY.image_size), _frames(rng, 2, TINY.image_size)
    params, state = tiny_variables["params"], {k: v for k, v in tiny_variables.items()
                                               if k != "params"}

    @jax.jit
    def loss_and_grads(params, key):
        def loss(params):
            out, _ = model.apply({"params": params, **state}, source, driving, train=True,
                                 dropout_p=0.2, dropout_rng=key, mutable=["batch_stats"])
            return (jnp.abs(out["prediction"] - driving).mean()
                    + jnp.abs(out["avd_kp"] - out["kp_driving"]).mean())
        return jax.value_and_grad(loss)(params)

    value, grads = loss_and_grads(params, jax.random.PRNGKey(3))
    assert np.isfinite(value)
    for path, grad in jax.tree_util.tree_flatten_with_path(grads)[0]:
        assert np.all(np.isfinite(grad)), path
    for module in ("kp_detector", "bg_predictor", "dense_motion_network", "inpainting_network",
                   "avd_network"):
        total = sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads[module]))
        assert total > 0, module


def test_cached_source_features_equal_the_plain_forward(rng, tiny_variables):
    """Animating frames against one encoded source == running the full model per frame."""
    model = TPSMM(TINY)
    source = _frames(rng, 1, TINY.image_size)
    driving = _frames(rng, 3, TINY.image_size)
    source_b = jnp.repeat(source, 3, axis=0)
    full = jax.jit(model.apply)(tiny_variables, source_b, driving)

    @jax.jit
    def cached_decode(variables, source, motion):
        features = model.apply(variables, source, method=TPSMM.encode_source)
        return model.apply(variables, features, source, motion, method=TPSMM.decode)

    cached = cached_decode(tiny_variables, source, full["dense_motion"])
    np.testing.assert_allclose(cached["prediction"], full["prediction"], atol=1e-5)


def test_tps_gradients_are_finite_when_keypoints_coincide():
    kp = jnp.zeros((1, 1, 5, 2)).at[0, 0, 1].set(jnp.array([0.3, -0.2]))  # 4 points coincide

    def flow_sum(kp_source):
        return geometry.keypoint_tps_grids(kp, kp_source, 8, 8).sum()

    grad = jax.jit(jax.grad(flow_sum))(kp + 0.1)
    assert np.all(np.isfinite(grad))
    grad_driving = jax.jit(jax.grad(lambda k: geometry.keypoint_tps_grids(k, kp, 8, 8).sum()))(kp)
    assert np.all(np.isfinite(grad_driving))


def test_tps_fits_its_control_points_closely(rng):
    control = jnp.asarray(rng.uniform(-0.8, 0.8, (2, 3, 5, 2)), jnp.float32)
    target = control + jnp.asarray(rng.normal(0, 0.05, control.shape), jnp.float32)
    affine, weights = geometry.fit_tps(control, target)
    mapped_BKP2 = geometry.apply_tps(control.reshape(2, 15, 2), affine, control, weights)
    # Transform k applied to its own control points: block k of the 15 points.
    mapped = jnp.stack([mapped_BKP2[:, k, 5 * k:5 * k + 5] for k in range(3)], axis=1)
    assert float(jnp.abs(mapped - target).max()) < 0.05  # regularised, so close, not exact


@pytest.mark.parametrize("scale,size", [(0.25, 64), (0.5, 30), (2.0, 9), (0.125, 256),
                                        (3.0, 5), (0.3, 20)])
def test_nearest_resize_matches_torch_legacy_interpolate(rng, scale, size):
    """Values and input gradients (repeats, strided slices and the gather fallback)."""
    x = rng.standard_normal((1, 2, size, size + 3)).astype(np.float32)
    x_torch = torch.tensor(x, requires_grad=True)
    expected = F.interpolate(x_torch, scale_factor=scale)
    weights = rng.standard_normal(expected.shape).astype(np.float32)
    (expected * torch.tensor(weights)).sum().backward()
    to_nhwc = lambda a: jnp.asarray(a.transpose(0, 2, 3, 1))
    got, vjp = jax.vjp(lambda v: resize_nearest(v, scale), to_nhwc(x))
    np.testing.assert_array_equal(np.asarray(got).transpose(0, 3, 1, 2), expected.detach().numpy())
    grad = np.asarray(vjp(to_nhwc(weights))[0]).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(grad, x_torch.grad.numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("out_size", [(32, 32), (128, 96), (7, 5)])
def test_bilinear_align_corners_matches_torch(rng, out_size):
    x = rng.standard_normal((2, 3, 16, 12)).astype(np.float32)
    expected = F.interpolate(torch.tensor(x), size=out_size, mode="bilinear",
                             align_corners=True).numpy()
    got = resize_bilinear_align_corners(jnp.asarray(x.transpose(0, 2, 3, 1)), *out_size)
    np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), expected, atol=1e-5)


def test_config_presets_and_overrides():
    assert load_model_config("ted-384").image_size == 384
    assert load_model_config("mgif-256").bg is False
    cfg = load_model_config("configs/tpsmm.py:small,num_tps=5,bg=false")
    assert (cfg.num_tps, cfg.bg, cfg.generator_block_expansion) == (5, False, 16)
    assert TPSMMConfig.from_dict(dataclasses.asdict(cfg)) == cfg


def test_encoder_width_sets_both_resnet_encoders():
    """Upstream's encoders start at torchvision's 64 channels; encoder_width narrows both."""
    for width in (64, 16):
        shapes = variable_shapes(TPSMMConfig(encoder_width=width))["params"]
        for encoder in (shapes["kp_detector"]["fg_encoder"], shapes["bg_predictor"]["bg_encoder"]):
            assert encoder["conv1"]["kernel"].shape[-1] == width
            assert encoder["layer4_1"]["conv2"]["kernel"].shape == (3, 3, 8 * width, 8 * width)
            assert encoder["fc"]["kernel"].shape[0] == 8 * width


@pytest.mark.parametrize("changes,message", [
    ({"scale_factor": 0.3}, "scale_factor"),
    ({"encoder_width": 0}, "encoder_width must be from 1"),
    ({"num_down_blocks": 2}, "num_down_blocks=3"),
    ({"image_size": 100}, "divisible"),
    ({"image_size": 160, "dense_num_blocks": 5}, "dense-motion hourglass"),
])
def test_invalid_configs_are_rejected(changes, message):
    with pytest.raises(SafeTriageError, match=message):
        dataclasses.replace(TPSMMConfig(), **changes)


def test_unknown_config_spec_is_a_clear_error(tmp_path):
    with pytest.raises(SafeTriageError, match="Unknown config"):
        load_model_config("vox-512")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("train_params: {}\n")
    with pytest.raises(SafeTriageError, match="model_params"):
        load_model_config(bad_yaml)
