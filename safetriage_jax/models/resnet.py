"""ResNet-18 (He et al. 2016, torchvision layout), the encoder of the keypoint and background nets.

Submodule names follow torchvision's state_dict (``layer2_0/downsample_0`` for
``layer2.0.downsample.0``) so that weight porting is a mechanical renaming.
"""

import flax.linen as nn
import jax.numpy as jnp

from safetriage_jax.models.layers import batch_norm, conv

STAGE_WIDTHS = (64, 128, 256, 512)


class BasicBlock(nn.Module):
    """Two 3x3 convs with BatchNorm and an identity (or 1x1 strided projection) shortcut."""

    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, x_BHWC, train: bool):
        out = conv(self.features, 3, self.stride, use_bias=False, name="conv1")(x_BHWC)
        out = nn.relu(batch_norm(train, name="bn1")(out))
        out = conv(self.features, 3, use_bias=False, name="conv2")(out)
        out = batch_norm(train, name="bn2")(out)
        if self.stride != 1 or x_BHWC.shape[-1] != self.features:
            x_BHWC = conv(self.features, 1, self.stride, use_bias=False, name="downsample_0")(x_BHWC)
            x_BHWC = batch_norm(train, name="downsample_1")(x_BHWC)
        return nn.relu(out + x_BHWC)


class ResNet18(nn.Module):
    """ResNet-18 with a linear head of ``num_outputs``; any number of input channels."""

    num_outputs: int
    head_kernel_init: object = nn.linear.default_kernel_init
    head_bias_init: object = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x_BHWC, train: bool = False):
        x_BHWC = conv(64, 7, 2, use_bias=False, name="conv1")(x_BHWC)
        x_BHWC = nn.relu(batch_norm(train, name="bn1")(x_BHWC))
        x_BHWC = nn.max_pool(x_BHWC, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage, width in enumerate(STAGE_WIDTHS):
            for block in range(2):
                stride = 2 if stage > 0 and block == 0 else 1
                x_BHWC = BasicBlock(width, stride, name=f"layer{stage + 1}_{block}")(x_BHWC, train)
        features_BC = jnp.mean(x_BHWC, axis=(1, 2))
        return nn.Dense(self.num_outputs, kernel_init=self.head_kernel_init,
                        bias_init=self.head_bias_init, name="fc")(features_BC)
