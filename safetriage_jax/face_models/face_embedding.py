"""dlib's face recognition ResNet as a Flax module: 150x150 RGB face chips to 128-D descriptors.

The network is dlib's ``anet_type`` (tools/python/src/face_recognition.cpp, dlib 20.0): a
7x7/2 convolution, affine, relu and 3x3/2 max pool, then 14 residual blocks in five levels
(widths 32, 64, 128, 256, 256; 29 convolutions in all), a global average and a 128-wide fully
connected layer without bias. Its batch norms were folded into per-channel affine layers before
the file was saved. A block is conv, affine, relu, conv, affine, added to its input, relu; the
first block of a level convolves with stride 2 and adds a 2x2/2 average pool of its input, zero
padded at the end of the channel and spatial axes where the two differ in size (dlib's add_prev).
Convolutions with stride 2 and the pools are unpadded; stride-1 3x3 convolutions pad by 1.
The descriptor is the fully connected layer's output, not normalised (dlib's loss_metric returns
it as is); dlib calls two faces the same person below a Euclidean distance of 0.6.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from safetriage_jax.deid.faces import _models_dir
from safetriage_jax.errors import SafeTriageError
from safetriage_jax.face_models import dlib_dnn
from safetriage_jax.face_models.face_chip import CHIP_PADDING, CHIP_SIZE, extract_chips

MODEL_FILE = "dlib_face_recognition_resnet_model_v1.dat"
DLIB_MEAN_RGB = (122.782, 117.001, 104.298)  # input_rgb_image_sized's defaults
# dlib computes in float32; GPUs would otherwise multiply in TF32 (10-bit mantissas) and move
# descriptors by ~1e-3, the whole parity budget.
FULL_FLOAT32 = jax.lax.Precision.HIGHEST
# (name, width, blocks, whether the first block halves the size), bottom to top.
LEVELS = (("level4", 32, 3, False), ("level3", 64, 4, True), ("level2", 128, 3, True),
          ("level1", 256, 3, True), ("level0", 256, 1, True))


def _con(stride):
    return {"stride": (stride, stride), "padding": (0, 0) if stride == 2 else (1, 1)}


def dlib_layers():
    """dlib's layers bottom to top: (kind, parameter path or None, expected record fields)."""
    layers = [("con", ("stem", "conv"), {"stride": (2, 2), "padding": (0, 0)}),
              ("affine", ("stem", "affine"), {}), ("relu", None, {}),
              ("max_pool", None, {"window": (3, 3), "stride": (2, 2), "padding": (0, 0)})]
    for level, _, blocks, halves in LEVELS:
        for index in range(blocks):
            block, stride = f"{level}_block{index}", 2 if halves and index == 0 else 1
            layers += [("tag1", None, {}), ("con", (block, "conv1"), _con(stride)),
                       ("affine", (block, "affine1"), {}), ("relu", None, {}),
                       ("con", (block, "conv2"), _con(1)), ("affine", (block, "affine2"), {})]
            if stride == 2:
                layers += [("tag2", None, {}), ("skip1", None, {}), (
                    "avg_pool", None, {"window": (2, 2), "stride": (2, 2), "padding": (0, 0)})]
            layers += [("add_prev", None, {}), ("relu", None, {})]
    whole_image = {"window": (0, 0), "stride": (1, 1), "padding": (0, 0)}
    return layers + [("avg_pool", None, whole_image), ("fc", ("embedding",), {})]


def read_params(path):
    """The network's parameters from dlib's model file, as a plain nested dict of arrays."""
    layers = dlib_layers()
    with open(path, "rb") as f:
        _, inputs, records = dlib_dnn.read_network(
            f, [kind for kind, _, _ in layers], dlib_dnn.read_input_rgb_image_sized,
            dlib_dnn.read_loss_metric)
    if inputs["size"] != (CHIP_SIZE, CHIP_SIZE):
        raise SafeTriageError(f"{path}: input size {inputs['size']}, expected {CHIP_SIZE}")
    params = {"input": {"mean_rgb": inputs["mean_rgb"]}}
    for index, ((kind, where, expected), record) in enumerate(zip(layers, records)):
        for field, value in expected.items():
            if record[field] != value:
                raise SafeTriageError(f"{path}: layer {index} ({kind}) has {field} "
                                 f"{record[field]}, dlib's face network has {value}")
        if where is None:
            continue
        node = params
        for key in where[:-1]:
            node = node.setdefault(key, {})
        if kind == "con":
            node[where[-1]] = {"kernel": record["weight_OIHW"].transpose(2, 3, 1, 0),
                               "bias": record["bias"]}
        elif kind == "affine":
            node[where[-1]] = {"scale": record["scale"], "shift": record["shift"]}
        else:
            if record["bias"] is not None:
                raise SafeTriageError(f"{path}: the last layer has a bias; dlib's face network has none")
            node[where[-1]] = {"kernel": record["weight_IO"]}
    return params


@functools.lru_cache(maxsize=1)
def load_params():
    """The parameters of dlib's model from ``face-recognition-models`` (read once)."""
    return jax.tree.map(jnp.asarray, read_params(_models_dir() / MODEL_FILE))


class Affine(nn.Module):
    """dlib's affine layer: a per-channel scale and shift (a batch norm folded for inference)."""

    @nn.compact
    def __call__(self, x_BHWC):
        channels = x_BHWC.shape[-1]
        return (x_BHWC * self.param("scale", nn.initializers.ones, (channels,))
                + self.param("shift", nn.initializers.zeros, (channels,)))


def _conv(features, kernel, stride, name):
    """dlib's con_ with its default padding: none at stride 2, kernel // 2 at stride 1."""
    padding = "VALID" if stride == 2 else [(kernel // 2, kernel // 2)] * 2
    return nn.Conv(features, (kernel, kernel), (stride, stride), padding, name=name,
                   precision=FULL_FLOAT32)


def _add_zero_padded(a_BHWC, b_BHWC):
    """dlib's add_prev: the sum over the larger extent of each axis, the smaller zero padded."""
    shape = np.maximum(a_BHWC.shape, b_BHWC.shape)
    pad = lambda x: jnp.pad(x, [(0, int(s - d)) for s, d in zip(shape, x.shape)])
    return pad(a_BHWC) + pad(b_BHWC)


class ResidualBlock(nn.Module):
    """conv, affine, relu, conv, affine, plus the input (2x2 average pooled at stride 2), relu."""

    width: int
    stride: int

    @nn.compact
    def __call__(self, x_BHWC):
        h = _conv(self.width, 3, self.stride, "conv1")(x_BHWC)
        h = nn.relu(Affine(name="affine1")(h))
        h = Affine(name="affine2")(_conv(self.width, 3, 1, "conv2")(h))
        if self.stride == 1:
            return nn.relu(x_BHWC + h)
        return nn.relu(_add_zero_padded(nn.avg_pool(x_BHWC, (2, 2), (2, 2)), h))


class FaceResNet(nn.Module):
    """dlib's face recognition ResNet: (B, 150, 150, 3) RGB chips, 0..255 in any dtype, to
    (B, 128) descriptors. Its parameters are the plain dict ``read_params`` returns."""

    @nn.compact
    def __call__(self, chips_BHW3):
        mean_rgb = self.param("input", lambda _: {"mean_rgb": jnp.array(DLIB_MEAN_RGB)})
        x = (chips_BHW3.astype(jnp.float32) - mean_rgb["mean_rgb"]) / 256.0
        x = Stem(name="stem")(x)
        for level, width, blocks, halves in LEVELS:
            for index in range(blocks):
                stride = 2 if halves and index == 0 else 1
                x = ResidualBlock(width, stride, name=f"{level}_block{index}")(x)
        embedding = nn.Dense(128, use_bias=False, precision=FULL_FLOAT32, name="embedding")
        return embedding(x.mean(axis=(1, 2)))


class Stem(nn.Module):
    """7x7/2 convolution, affine, relu, 3x3/2 max pool (150 -> 72 -> 35 pixels)."""

    @nn.compact
    def __call__(self, x_BHWC):
        x = nn.relu(Affine(name="affine")(_conv(32, 7, 2, "conv")(x_BHWC)))
        return nn.max_pool(x, (3, 3), (2, 2))


@jax.jit
def embed_chips(params, chips_BHW3):
    """Descriptors (B, 128) of aligned 150x150 face chips (dlib.get_face_chip's framing)."""
    return FaceResNet().apply({"params": params}, chips_BHW3)


def embed_batch(images_BHW3, landmarks_BNx2, params=None):
    """dlib's ``compute_face_descriptor(image, shape)`` with its default num_jitters=0 (no
    jitter), batched: one face per image, its 68 (or 5) landmarks in pixels. Returns (B, 128)."""
    params = load_params() if params is None else params
    chips_BHW3 = extract_chips(images_BHW3, landmarks_BNx2, CHIP_SIZE, CHIP_PADDING)
    return embed_chips(params, chips_BHW3)
