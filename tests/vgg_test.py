"""VGG-19 perceptual features: ported torchvision-layout weights reproduce a plain-torch VGG-19."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from safetriage_jax.errors import SafeTriageError
from safetriage_jax.models.vgg import (IMAGENET_MEAN, IMAGENET_STD, VGG19Features,
                                       random_vgg19_variables, variable_shapes)
from safetriage_jax.parity import relative_error
from safetriage_jax.porting import port_vgg19

# torchvision's vgg19().features, written out here: "M" = MaxPool2d(2, 2); each int is a
# Conv2d(3x3, padding 1) followed by a ReLU. Cut after index 29 (relu5_1), as upstream uses it.
TORCH_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512)
SLICES = ((0, 2), (2, 7), (7, 12), (12, 21), (21, 30))  # relu1_1 .. relu5_1


def torch_vgg19_features(seed):
    """features[0:30] in torchvision's index layout, He-initialised from a seeded generator."""
    layers, channels = [], 3
    for width in TORCH_LAYERS:
        if width == "M":
            layers.append(torch.nn.MaxPool2d(2, 2))
        else:
            layers += [torch.nn.Conv2d(channels, width, 3, padding=1), torch.nn.ReLU()]
            channels = width
    features = torch.nn.Sequential(*layers)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in features:
            if isinstance(layer, torch.nn.Conv2d):
                fan_in = layer.in_channels * 9
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator)
                                   * (2.0 / fan_in) ** 0.5)
                layer.bias.copy_(0.1 * torch.randn(layer.bias.shape, generator=generator))
    assert len(features) == 30
    return features.eval()


def torch_slices(features, images_BCHW):
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x, outputs = (images_BCHW - mean) / std, []
    with torch.no_grad():
        for start, stop in SLICES:
            x = features[start:stop](x)
            outputs.append(x.numpy())
    return outputs


def save_state_dict(features, path, **changes):
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(7, 5)  # torchvision files have a classifier too
    state.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del state[key]
    torch.save(state, path)
    return path


def test_ported_features_match_torch(tmp_path, rng):
    features = torch_vgg19_features(int(rng.integers(2 ** 31)))
    variables = port_vgg19(save_state_dict(features, tmp_path / "vgg19.pth"))
    images = rng.uniform(0, 1, (2, 3, 37, 45)).astype(np.float32)
    expected = torch_slices(features, torch.from_numpy(images))
    with jax.default_matmul_precision("highest"):
        got = VGG19Features().apply(variables, jnp.asarray(images.transpose(0, 2, 3, 1)))
    assert len(got) == 5
    errors = []
    for name, out, ref in zip(["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"], got, expected):
        out = np.asarray(out).transpose(0, 3, 1, 2)
        assert out.shape == ref.shape, name
        errors.append(relative_error(out, ref))
    print("relative errors relu1_1..relu5_1:", ", ".join(f"{e:.2e}" for e in errors))
    assert max(errors) < 1e-5, errors
    # He scaling keeps the deepest features O(1), so the comparison above is meaningful.
    assert 0.1 < np.abs(expected[-1]).mean() < 10


def test_state_dict_wrappers_are_accepted(tmp_path):
    features = torch_vgg19_features(0)
    state = {f"module.features.{k}": v for k, v in features.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "wrapped.pth")
    plain = port_vgg19(save_state_dict(features, tmp_path / "plain.pth"))
    wrapped = port_vgg19(tmp_path / "wrapped.pth")
    assert jax.tree.all(jax.tree.map(np.array_equal, wrapped, plain))


def test_random_variables_have_the_ported_structure():
    variables = random_vgg19_variables(jax.random.PRNGKey(1))
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), variables)
    assert shapes == jax.tree.map(lambda s: (s.shape, s.dtype), variable_shapes())
    assert sorted(variables["params"]) == sorted(
        f"features_{i}" for i in (0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28))
    outputs = VGG19Features().apply(variables, jnp.full((1, 32, 32, 3), 0.5).at[:, ::3].set(0.9))
    assert [o.shape[1:] for o in outputs] == [(32, 32, 64), (16, 16, 128), (8, 8, 256),
                                              (4, 4, 512), (2, 2, 512)]
    assert 0.05 < float(jnp.abs(outputs[-1]).mean()) < 20  # He scaling: O(1), not vanishing


def test_missing_file_says_where_the_weights_come_from(tmp_path):
    with pytest.raises(SafeTriageError, match=r"does not exist.*vgg19-dcbb9e9d\.pth.*random"):
        port_vgg19(tmp_path / "vgg19-dcbb9e9d.pth")


def test_garbage_file_is_rejected(tmp_path):
    garbage = tmp_path / "vgg19.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(SafeTriageError, match="Could not read .*VGG-19 state_dict"):
        port_vgg19(garbage)


@pytest.mark.parametrize("changes, message", [
    ({"features.28.weight": torch.zeros(256, 512, 3, 3)},
     r"features\.28\.weight has shape \(256, 512, 3, 3\) but VGG-19 needs \(512, 512, 3, 3\)"),
    ({"features.28.weight": None}, r"features\.28\.weight is missing but VGG-19 needs \(512, 512, 3, 3\)"),
    ({"features.0.bias": torch.zeros(32)}, r"features\.0\.bias has shape \(32,\) but VGG-19 needs \(64,\)"),
])
def test_foreign_state_dict_names_key_and_shapes(tmp_path, changes, message):
    path = save_state_dict(torch_vgg19_features(0), tmp_path / "vgg.pth", **changes)
    with pytest.raises(SafeTriageError, match=message):
        port_vgg19(path)
