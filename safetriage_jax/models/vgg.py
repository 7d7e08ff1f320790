"""torchvision's VGG-19 ``features`` up to relu5_1: the extractor of upstream TPSMM's perceptual loss.
Convs are named ``features_{i}`` after torchvision's indices, so its weights port by renaming.
"""

import math

import jax
import jax.numpy as jnp
import flax.linen as nn

from safetriage_jax.models.layers import conv
from safetriage_jax.models.policy import Policy, conv_output

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's VGG-19 ("E") widths, "M" = 2x2 max pool, cut after the conv at index 28.
_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512)
# Upstream's slices are features[0:2], [2:7], [7:12], [12:21], [21:30]: relu1_1 .. relu5_1.
SLICE_ENDS = (2, 7, 12, 21, 30)


class VGG19Features(nn.Module):
    """Images in [0, 1] (NHWC) -> [relu1_1, relu2_1, relu3_1, relu4_1, relu5_1] (NHWC).

    The input is ImageNet-normalised first, as upstream's ``Vgg19`` does. The weights are frozen
    (torchvision's ImageNet weights via ``porting.port_vgg19``): the loss stops gradients to them.
    Convolutions and activations run in the policy's compute dtype; remat is the caller's.
    """

    num_slices: int = 5  # stop after this many outputs (a loss that ignores relu5_1 skips it)
    policy: Policy = Policy()

    @nn.compact
    def __call__(self, images_BHWC):
        dtype = self.policy.dtype
        images_BHWC = images_BHWC.astype(dtype)
        mean = jnp.asarray(IMAGENET_MEAN, dtype)
        std = jnp.asarray(IMAGENET_STD, dtype)
        x_BHWC = (images_BHWC - mean) / std
        outputs, index = [], 0
        for width in _LAYERS:
            if width == "M":  # MaxPool2d(2, 2): floors odd sizes, like torch
                x_BHWC = nn.max_pool(x_BHWC, (2, 2), strides=(2, 2))
                index += 1
            else:  # Conv2d(3x3, padding 1) at `index`, ReLU at index + 1
                x_BHWC = nn.relu(conv_output(conv(width, 3, dtype=dtype,
                                                  name=f"features_{index}")(x_BHWC)))
                index += 2
            if index in SLICE_ENDS:
                outputs.append(x_BHWC)
                if len(outputs) == self.num_slices:
                    break
        return outputs


def variable_shapes():
    """``{"params": ...}`` of :class:`VGG19Features` as ShapeDtypeStructs (``eval_shape`` of init)."""
    return jax.eval_shape(VGG19Features().init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32))


@jax.jit
def random_vgg19_variables(rng):
    """Random weights for ``perceptual_weights: random`` (tests and smoke runs only).

    He-normal kernels and zero biases, so activations stay O(1) through the 13 conv+ReLU layers.
    """
    shapes, treedef = jax.tree.flatten(variable_shapes())
    sizes = [math.prod(s.shape) for s in shapes]
    # One draw sliced up: a normal per kernel shape would cost seconds of XLA compile time on CPU.
    noise = jax.random.normal(rng, (sum(sizes),), jnp.float32)
    leaves, offset = [], 0
    for shape_dtype, size in zip(shapes, sizes):
        shape = shape_dtype.shape
        if len(shape) == 4:
            he_std = math.sqrt(2.0 / math.prod(shape[:-1]))
            leaves.append(noise[offset:offset + size].reshape(shape) * he_std)
        else:
            leaves.append(jnp.zeros(shape, jnp.float32))
        offset += size
    return jax.tree.unflatten(treedef, leaves)
