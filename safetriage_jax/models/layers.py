"""Building blocks shared by the TPSMM networks (channels-last, PyTorch-equivalent numerics).

Upstream semantics kept on purpose: symmetric conv padding (PyTorch's ``padding=p``, which is
not XLA's 'SAME' for stride 2), InstanceNorm with eps 1e-5 and an affine transform, 2x2
average-pool down-sampling, and PyTorch's legacy nearest-neighbour resizing.
"""

import flax.linen as nn
import jax.numpy as jnp
from jax import lax
import numpy as np

from safetriage_jax.models.policy import Policy, conv_output


def conv(features, kernel_size, stride=1, use_bias=True, dtype=jnp.float32, name=None):
    """Conv with PyTorch's symmetric zero padding of ``kernel_size // 2`` on each side.

    Input and (float32) kernel are cast to ``dtype``, the compute and output dtype.
    """
    pad = kernel_size // 2
    return nn.Conv(features, (kernel_size, kernel_size), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)), use_bias=use_bias, dtype=dtype, name=name)


def instance_norm(dtype=jnp.float32, name=None):
    """PyTorch ``InstanceNorm2d(affine=True)``: per-image, per-channel, biased variance.

    Statistics in float32 whatever ``dtype`` (the output dtype) is.
    """
    return nn.InstanceNorm(epsilon=1e-5, use_fast_variance=False, dtype=dtype, name=name)


def batch_norm(train, dtype=jnp.float32, name=None):
    """PyTorch ``BatchNorm`` (momentum 0.1 == flax momentum 0.9), running stats in eval.

    Statistics and running averages in float32; the output in ``dtype``.
    """
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                        use_fast_variance=False, dtype=dtype, name=name)


def nearest_indices(in_size, scale):
    """Source rows PyTorch's legacy ``interpolate(scale_factor=scale, mode='nearest')`` reads."""
    out_size = int(np.floor(in_size * scale))
    inverse = np.float32(1.0 / scale)
    index = np.floor(np.arange(out_size, dtype=np.float32) * inverse).astype(np.int32)
    return np.minimum(index, in_size - 1)


def _take_rows(x, index, axis):
    """``jnp.take(x, index, axis)`` for a static ``index``, without a gather where it can.

    A repeat (each row ``r`` times: x2 up-sampling) becomes broadcast + reshape and an
    arithmetic progression (down-sampling) a strided slice: their gradients are a sum and a
    pad, where a gather's is a scatter with full-size index tensors kept for the backward.
    """
    size = x.shape[axis]
    repeats = len(index) // size
    if repeats * size == len(index) and np.array_equal(index, np.repeat(np.arange(size), repeats)):
        x = jnp.expand_dims(x, axis + 1)
        x = jnp.broadcast_to(x, x.shape[:axis + 1] + (repeats,) + x.shape[axis + 2:])
        return x.reshape(x.shape[:axis] + (size * repeats,) + x.shape[axis + 2:])
    stride = int(index[1] - index[0]) if len(index) > 1 else 1
    if stride > 0 and np.array_equal(index, index[0] + stride * np.arange(len(index))):
        return lax.slice_in_dim(x, int(index[0]), int(index[-1]) + 1, stride, axis)
    return jnp.take(x, index, axis=axis)


def resize_nearest(x_BHWC, scale):
    """Legacy nearest resize by ``scale`` (used for x2 up-sampling and anti-aliased down-sampling)."""
    _, height, width, _ = x_BHWC.shape
    x_BHWC = _take_rows(x_BHWC, nearest_indices(height, scale), axis=1)
    return _take_rows(x_BHWC, nearest_indices(width, scale), axis=2)


def _align_corners_taps(in_size, out_size):
    """Lower index and weight of the upper neighbour for an align_corners=True linear resize."""
    if out_size == 1:
        pos = np.zeros(1, np.float64)
    else:
        pos = np.arange(out_size) * ((in_size - 1) / (out_size - 1))
    low = np.minimum(np.floor(pos), in_size - 1).astype(np.int32)
    high = np.minimum(low + 1, in_size - 1)
    return low, high, (pos - low).astype(np.float32)


def resize_bilinear_align_corners(x_BHWC, out_h, out_w):
    """PyTorch ``interpolate(size, mode='bilinear', align_corners=True)``, separably."""
    _, height, width, _ = x_BHWC.shape
    if (height, width) == (out_h, out_w):
        return x_BHWC
    low, high, frac = _align_corners_taps(height, out_h)
    frac = frac[None, :, None, None].astype(x_BHWC.dtype)  # numpy float32 would promote bf16
    x_BHWC = jnp.take(x_BHWC, low, axis=1) * (1 - frac) + jnp.take(x_BHWC, high, axis=1) * frac
    low, high, frac = _align_corners_taps(width, out_w)
    frac = frac[None, None, :, None].astype(x_BHWC.dtype)
    return jnp.take(x_BHWC, low, axis=2) * (1 - frac) + jnp.take(x_BHWC, high, axis=2) * frac


def _conv_norm_relu(x_BHWC, features, kernel_size, dtype):
    """Conv -> InstanceNorm -> ReLU; call inside a compact method (creates 'conv', 'norm')."""
    x_BHWC = conv_output(conv(features, kernel_size, dtype=dtype, name="conv")(x_BHWC))
    return nn.relu(instance_norm(dtype, name="norm")(x_BHWC))


class SameBlock(nn.Module):
    """Conv -> InstanceNorm -> ReLU at constant resolution."""

    features: int
    kernel_size: int = 3
    policy: Policy = Policy()

    @nn.compact
    def __call__(self, x_BHWC):
        return _conv_norm_relu(x_BHWC, self.features, self.kernel_size, self.policy.dtype)


class DownBlock(nn.Module):
    """Conv -> InstanceNorm -> ReLU -> 2x2 average pool (halves H and W)."""

    features: int
    policy: Policy = Policy()

    @nn.compact
    def __call__(self, x_BHWC):
        x_BHWC = _conv_norm_relu(x_BHWC, self.features, 3, self.policy.dtype)
        return nn.avg_pool(x_BHWC, (2, 2), strides=(2, 2))


class UpBlock(nn.Module):
    """Nearest x2 up-sampling -> Conv -> InstanceNorm -> ReLU (doubles H and W)."""

    features: int
    policy: Policy = Policy()

    @nn.compact
    def __call__(self, x_BHWC):
        return _conv_norm_relu(resize_nearest(x_BHWC, 2.0), self.features, 3, self.policy.dtype)


class ResBlock(nn.Module):
    """Pre-activation residual block (norm -> ReLU -> conv, twice) at constant width."""

    policy: Policy = Policy()

    @nn.compact
    def __call__(self, x_BHWC):
        features, dtype = x_BHWC.shape[-1], self.policy.dtype
        out = nn.relu(instance_norm(dtype, name="norm1")(x_BHWC))
        out = conv_output(conv(features, 3, dtype=dtype, name="conv1")(out))
        out = nn.relu(instance_norm(dtype, name="norm2")(out))
        out = conv_output(conv(features, 3, dtype=dtype, name="conv2")(out))
        return out + x_BHWC


class Hourglass(nn.Module):
    """U-Net: ``num_blocks`` down blocks, then up blocks concatenating the skips.

    Returns the decoder's outputs, coarsest first; the last one is at input resolution with
    ``block_expansion + in_channels`` channels.
    """

    block_expansion: int
    max_features: int
    num_blocks: int
    policy: Policy = Policy()

    def setup(self):
        # Level i has min(max_features, block_expansion * 2**i) channels, shallowest first.
        widths = [min(self.max_features, self.block_expansion * 2 ** i)
                  for i in range(self.num_blocks + 1)]
        self.encoder = HourglassEncoder(tuple(widths[1:]), self.policy)
        self.decoder = HourglassDecoder(tuple(widths[:-1]), self.policy)

    def __call__(self, x_BHWC):
        return self.decoder(self.encoder(x_BHWC))


class HourglassEncoder(nn.Module):
    widths: tuple
    policy: Policy = Policy()

    @nn.compact
    def __call__(self, x_BHWC):
        skips = [x_BHWC]
        down_block = self.policy.block(DownBlock)
        for i, width in enumerate(self.widths):
            skips.append(down_block(width, self.policy, name=f"down_blocks_{i}")(skips[-1]))
        return skips


class HourglassDecoder(nn.Module):
    widths: tuple  # up-block output channels, shallowest first
    policy: Policy = Policy()

    @nn.compact
    def __call__(self, skips):
        skips = list(skips)
        out = skips.pop()
        outs = []
        up_block = self.policy.block(UpBlock)
        for i, width in enumerate(reversed(self.widths)):
            out = up_block(width, self.policy, name=f"up_blocks_{i}")(out)
            out = jnp.concatenate([out, skips.pop()], axis=-1)
            outs.append(out)
        return outs


def gaussian_kernel_2d(scale):
    """Normalised Gaussian low-pass for down-sampling by ``scale`` (sigma = (1/scale - 1) / 2)."""
    sigma = (1 / scale - 1) / 2
    size = 2 * round(sigma * 4) + 1
    axis = np.arange(size, dtype=np.float32) - (size - 1) / 2
    one_d = np.exp(-axis ** 2 / (2 * sigma ** 2))
    kernel = np.outer(one_d, one_d)
    return (kernel / kernel.sum()).astype(np.float32)


def depthwise_gaussian(scale, channels):
    """(k, k, 1, C) depthwise kernel of :func:`gaussian_kernel_2d`."""
    return jnp.asarray(np.tile(gaussian_kernel_2d(scale)[:, :, None, None], (1, 1, 1, channels)))


class AntiAliasDownsample(nn.Module):
    """Gaussian blur (depthwise, zero padded) then legacy-nearest down-sampling by ``scale``.

    The blur kernel is a buffer (variable collection ``buffers``), as upstream stores it in its
    state_dict, so a ported checkpoint reproduces upstream exactly (half-precision files too).
    """

    scale: float

    @nn.compact
    def __call__(self, x_BHWC):
        if self.scale == 1:
            return x_BHWC
        kernel_HW1C = self.variable("buffers", "kernel", depthwise_gaussian, self.scale,
                                    x_BHWC.shape[-1]).value
        return anti_alias_downsample(x_BHWC, self.scale, kernel_HW1C)


def anti_alias_downsample(x_BHWC, scale, kernel_HW1C=None):
    """Upstream's AntiAliasInterpolation2d: Gaussian blur (sigma from ``scale``) then nearest."""
    if scale == 1:
        return x_BHWC
    if kernel_HW1C is None:
        kernel_HW1C = depthwise_gaussian(scale, x_BHWC.shape[-1])
    size = kernel_HW1C.shape[0]
    before = size // 2
    after = before - 1 if size % 2 == 0 else before
    x_BHWC = conv_depthwise(x_BHWC, kernel_HW1C, ((before, after), (before, after)))
    return resize_nearest(x_BHWC, scale)


def conv_depthwise(x_BHWC, kernel_HW1C, padding):
    """Depthwise 2-D convolution (one filter per channel)."""
    return lax.conv_general_dilated(
        x_BHWC, kernel_HW1C.astype(x_BHWC.dtype), window_strides=(1, 1), padding=padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x_BHWC.shape[-1])
