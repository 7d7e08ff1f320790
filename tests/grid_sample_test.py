"""The grid-sample op and its XLA reference against PyTorch's F.grid_sample: values and both gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import FIXTURE
from safetriage_jax.kernels.grid_sample import PADDING_MODES, api, grid_sample
from safetriage_jax.parity import relative_error

MODES = [(mode, ac) for mode in PADDING_MODES for ac in (False, True)]


def torch_reference(image_BCHW, grid_BHW2, cotangent_BCHW, mode, align_corners,
                    dtype=torch.float64):
    image = torch.tensor(image_BCHW, dtype=dtype, requires_grad=True)
    grid = torch.tensor(grid_BHW2, dtype=dtype, requires_grad=True)
    out = F.grid_sample(image, grid, mode="bilinear", padding_mode=mode,
                        align_corners=align_corners)
    out.backward(torch.tensor(cotangent_BCHW, dtype=dtype))
    return out.detach().numpy(), image.grad.numpy(), grid.grad.numpy()


def jax_value_and_vjp(image_BCHW, grid_BHW2, cotangent_BCHW, mode, align_corners):
    def sample(image_BHWC, grid):
        return grid_sample(image_BHWC, grid, padding_mode=mode, align_corners=align_corners)

    image_BHWC = jnp.asarray(image_BCHW.transpose(0, 2, 3, 1), jnp.float32)
    out, vjp = jax.vjp(jax.jit(sample), image_BHWC, jnp.asarray(grid_BHW2, jnp.float32))
    d_image, d_grid = vjp(jnp.asarray(cotangent_BCHW.transpose(0, 2, 3, 1), jnp.float32))
    return (np.asarray(out).transpose(0, 3, 1, 2), np.asarray(d_image).transpose(0, 3, 1, 2),
            np.asarray(d_grid))


@pytest.mark.parametrize("mode,align_corners", MODES)
def test_matches_upstream_fixture(mode, align_corners):
    data = np.load(FIXTURE / "expected.npz")
    image_BHWC = jnp.asarray(data["gs_input"].transpose(0, 2, 3, 1))
    out = grid_sample(image_BHWC, jnp.asarray(data["gs_grid"]), padding_mode=mode,
                      align_corners=align_corners)
    expected = data[f"gs_{mode}_ac{int(align_corners)}"]
    assert relative_error(np.asarray(out).transpose(0, 3, 1, 2), expected) < 1e-5


def test_gradients_match_upstream_fixture():
    data = np.load(FIXTURE / "expected.npz")
    _, d_image, d_grid = jax_value_and_vjp(data["gs_input"], data["gs_grid"],
                                           data["gs_zeros_ac1_cotangent"], "zeros", True)
    assert relative_error(d_image, data["gs_zeros_ac1_dinput"]) < 1e-5
    assert relative_error(d_grid, data["gs_zeros_ac1_dgrid"]) < 1e-5


@pytest.mark.parametrize("mode,align_corners", MODES)
@pytest.mark.parametrize("shape", [(2, 3, 9, 14, 7, 5), (1, 8, 32, 17, 40, 33)])
def test_random_inputs_match_torch(rng, mode, align_corners, shape):
    batch, channels, height, width, out_h, out_w = shape
    image = rng.standard_normal((batch, channels, height, width)).astype(np.float32)
    # Out-of-range coordinates on purpose: padding modes and reflections are exercised.
    grid = rng.uniform(-1.6, 1.6, (batch, out_h, out_w, 2)).astype(np.float32)
    cotangent = rng.standard_normal((batch, channels, out_h, out_w)).astype(np.float32)
    expected = torch_reference(image, grid, cotangent, mode, align_corners)
    actual = jax_value_and_vjp(image, grid, cotangent, mode, align_corners)
    for name, got, want in zip(("value", "d_image", "d_grid"), actual, expected):
        assert relative_error(got, want) < 1e-5, name


@pytest.mark.parametrize("mode,align_corners", MODES)
def test_pixel_centres_and_borders_match_torch(rng, mode, align_corners):
    """Coordinates exactly on pixel centres and image borders, where branches meet.

    The grid gradient jumps at pixel centres (left vs right derivative), so which side is
    taken depends on float rounding: the reference runs in float32 like the op.
    """
    height, width = 6, 7
    image = rng.standard_normal((1, 2, height, width)).astype(np.float32)
    xs = np.linspace(-1, 1, width).astype(np.float32)
    ys = np.linspace(-1, 1, height).astype(np.float32)
    grid = np.stack(np.meshgrid(xs, ys), -1)[None]
    cotangent = rng.standard_normal((1, 2, height, width)).astype(np.float32)
    expected = torch_reference(image, grid, cotangent, mode, align_corners, torch.float32)
    actual = jax_value_and_vjp(image, grid, cotangent, mode, align_corners)
    for name, got, want in zip(("value", "d_image", "d_grid"), actual, expected):
        assert relative_error(got, want) < 1e-5, name


def test_bfloat16_images_follow_float32(rng):
    image = jnp.asarray(rng.uniform(size=(2, 16, 16, 4)), jnp.bfloat16)
    grid = jnp.asarray(rng.uniform(-1, 1, (2, 8, 8, 2)), jnp.float32)
    out = grid_sample(image, grid)
    assert out.dtype == jnp.bfloat16
    reference = grid_sample(image.astype(jnp.float32), grid)
    assert relative_error(out.astype(jnp.float32), reference) < 1e-2


def test_grid_batch_multiple_of_image_batch_reads_image_b(rng):
    """Grid rows b*T + t read image b: the same as repeating each image T times."""
    image = rng.standard_normal((2, 3, 9, 11)).astype(np.float32)
    grid = rng.uniform(-1.2, 1.2, (6, 5, 7, 2)).astype(np.float32)
    cotangent = rng.standard_normal((6, 3, 5, 7)).astype(np.float32)
    repeated = np.repeat(image, 3, axis=0)
    expected = torch_reference(repeated, grid, cotangent, "zeros", True)
    value, d_image, d_grid = jax_value_and_vjp(image, grid, cotangent, "zeros", True)
    assert relative_error(value, expected[0]) < 1e-5
    assert relative_error(d_image, expected[1].reshape(2, 3, 3, 9, 11).sum(1)) < 1e-5
    assert relative_error(d_grid, expected[2]) < 1e-5


def test_bad_arguments_raise_clear_errors():
    image, grid = jnp.zeros((2, 4, 4, 3)), jnp.zeros((2, 3, 3, 2))
    with pytest.raises(ValueError, match="padding_mode"):
        grid_sample(image, grid, padding_mode="wrap")
    with pytest.raises(ValueError, match="multiple"):
        grid_sample(image, grid[:1])
    with pytest.raises(ValueError, match=r"\(B, Ho, Wo, 2\)"):
        grid_sample(image, grid[..., :1])
    with pytest.raises(ValueError, match="implementation"):
        grid_sample(image, grid, implementation="cuda")
    with pytest.raises(ValueError, match="floating"):
        grid_sample(image.astype(jnp.int32), grid)


def test_a_backend_that_declines_falls_through_to_the_next(monkeypatch):
    calls = []

    def declines(*args, **kwargs):
        calls.append("declined")
        raise NotImplementedError("this case is not supported")

    monkeypatch.setitem(api.IMPLEMENTATIONS, "declining", declines)
    image = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
    grid = jnp.zeros((2, 3, 3, 2))
    out = grid_sample(image, grid, implementation="declining")
    assert calls == ["declined"]
    np.testing.assert_array_equal(out, grid_sample(image, grid, implementation="xla"))
